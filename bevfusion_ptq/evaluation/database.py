"""Open a nuScenes database (the devkit's ``NuScenes``) with errors a user can act on.

The devkit reports a missing table or map mask with a bare ``AssertionError`` or
``FileNotFoundError`` deep in its loader, and an incompatible version/split pair only once
the evaluation is under way. We check the layout first and fail with one line naming the
folder and what is missing, before any model work.

The same code serves a generated tree (``v1.0-trainval`` written by the generator), a real
``v1.0-trainval`` root and ``v1.0-mini``; the version is found in the root unless given.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bevfusion_ptq.data.nuscenes_tables import TABLE_NAMES
from bevfusion_ptq.errors import DatasetError

log = logging.getLogger(__name__)

#: The split each version's keyframes are evaluated on (the devkit ties them together).
SPLIT_OF_VERSION: dict[str, str] = {"trainval": "val", "mini": "mini_val"}
_PREFERRED = ("v1.0-trainval", "v1.0-mini")


def resolve_version(dataroot: str | Path, version: str | None) -> str:
    """``version`` if given, else the one table folder found under ``dataroot``.

    ``v1.0-trainval`` is preferred over ``v1.0-mini`` when both are there; a test-only
    version (no annotations) is never chosen.
    """
    root = Path(dataroot)
    if version:
        return version
    found = sorted(
        p.name for p in root.glob("v1.0-*") if (p / "sample.json").is_file() and not p.name.endswith("test")
    )
    for name in _PREFERRED:
        if name in found:
            return name
    if len(found) == 1:
        return found[0]
    if not found:
        raise DatasetError(
            f"{root}: no nuScenes tables found (looked for v1.0-*/sample.json); the evaluation needs the "
            "dataset's JSON tables: pass --eval-version, or --eval-samples 0 to skip the evaluation"
        )
    raise DatasetError(f"{root}: several nuScenes versions found ({', '.join(found)}); choose one with --eval-version")


def split_for(version: str, split: str | None) -> str:
    """The evaluation split: ``split`` if given (checked against the version), else the
    version's validation split."""
    kind = next((k for k in SPLIT_OF_VERSION if version.endswith(k)), None)
    if kind is None:
        raise DatasetError(
            f"nuScenes version {version!r} has no annotated validation split; use a *trainval or *mini version"
        )
    expected = SPLIT_OF_VERSION[kind]
    if split is not None and split != expected:
        raise DatasetError(
            f"split {split!r} does not belong to nuScenes version {version!r} (its split is {expected!r})"
        )
    return expected


def check_tables(dataroot: str | Path, version: str) -> Path:
    """The table folder, after checking that every table the devkit loads is present."""
    folder = Path(dataroot) / version
    if not folder.is_dir():
        raise DatasetError(f"nuScenes tables not found: {folder} is not a directory (version {version!r})")
    missing = [f"{name}.json" for name in TABLE_NAMES if not (folder / f"{name}.json").is_file()]
    if missing:
        raise DatasetError(f"{folder}: nuScenes tables missing: {', '.join(missing)}")
    return folder


def open_nuscenes(dataroot: str | Path, version: str) -> Any:
    """``nuscenes.NuScenes(version, dataroot)``, quietly, with the checks above first."""
    from nuscenes import NuScenes

    check_tables(dataroot, version)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    except (AssertionError, FileNotFoundError, KeyError, ValueError) as exc:
        raise DatasetError(
            f"{Path(dataroot) / version}: nuscenes-devkit cannot load the tables ({type(exc).__name__}: {exc})"
        ) from None


def split_sample_tokens(nusc: Any, split: str) -> list[str]:
    """Tokens of the samples whose scene is in the devkit's ``split`` (what ``load_gt`` keeps)."""
    from nuscenes.utils.splits import create_splits_scenes

    scenes = set(create_splits_scenes()[split])
    return [s["token"] for s in nusc.sample if nusc.get("scene", s["scene_token"])["name"] in scenes]


@dataclass(frozen=True)
class EvalSplit:
    """An opened database and the split that evaluation scores against."""

    nusc: Any
    version: str
    split: str
    tokens: list[str]  # every sample of the split


def open_eval_split(dataroot: str | Path, version: str | None, split: str | None) -> EvalSplit:
    """The version (found unless given), its validation split and the split's samples, with
    every layout problem failing in one line before any model work."""
    version = resolve_version(dataroot, version)
    split = split_for(version, split)
    nusc = open_nuscenes(dataroot, version)
    tokens = split_sample_tokens(nusc, split)
    if not tokens:
        raise DatasetError(
            f"{Path(dataroot) / version}: no samples in split {split!r} (scene names are not the devkit's)"
        )
    return EvalSplit(nusc, version, split, tokens)
