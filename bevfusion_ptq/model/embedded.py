"""Checkpoints shipped in the package: the default weights of a shipped config.

``bevfusion-tiny`` ships weights trained on generated data (``bevfusion_ptq/checkpoints/
bevfusion-tiny.pth``, by ``tools/train_tiny.py``; its sha256, generator settings and training
command are in ``bevfusion-tiny.json`` beside it), so that the default run's histograms,
amax values and fidelity figures come from a network that detects something. Other configs
ship none: their default stays a random-weight checkpoint. :data:`RANDOM` (``--checkpoint
random``) asks for random weights explicitly, whatever the config.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from ..errors import CheckpointError
from .config import CONFIG_DIR, config_path

log = logging.getLogger(__name__)

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
RANDOM = "random"
#: shipped config file -> shipped checkpoint file (both in the package)
EMBEDDED: dict[str, str] = {"bevfusion_tiny.py": "bevfusion-tiny.pth"}


def embedded_checkpoint_path(config: str) -> Path | None:
    """Where a shipped config's checkpoint belongs, or None when the config has none.

    Only the shipped config files qualify (a user's ``bevfusion_tiny.py`` elsewhere may
    describe another network).
    """
    path = config_path(config).resolve()
    if path.parent != CONFIG_DIR.resolve() or path.name not in EMBEDDED:
        return None
    return CHECKPOINT_DIR / EMBEDDED[path.name]


def embedded_checkpoint(config: str) -> Path | None:
    """The shipped checkpoint of ``config`` when its file is present; None otherwise.

    A shipped config whose file is missing (a checkout from before the trained file was
    committed) falls back to random weights: logged once as a WARNING, so figures from such
    a run are not mistaken for a trained model's.
    """
    path = embedded_checkpoint_path(config)
    if path is None:
        return None
    if not path.is_file():
        _warn_missing(str(path))
        return None
    return path


@functools.lru_cache(maxsize=None)
def _warn_missing(path: str) -> None:
    log.warning("the embedded checkpoint %s is missing: the default falls back to RANDOM weights", path)


def verify_embedded(path: Path, sha256: str) -> None:
    """Refuse a shipped checkpoint whose sha256 is not the one recorded beside it."""
    record = path.with_suffix(".json")
    if not record.is_file():
        return
    expected = json.loads(record.read_text()).get("sha256")
    if expected and expected != sha256:
        raise CheckpointError(
            f"embedded checkpoint {path} has sha256 {sha256}, but {record.name} records {expected}: "
            "the file was changed without its record"
        )
