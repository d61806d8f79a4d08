"""Save a calibrated model as a versioned, checksummed directory.

Layout: ``<root>/<model>/<version>/`` with the files below and ``manifest.json`` written
last. A version directory only ever appears complete: files are written into a hidden
staging directory that is renamed into place, so a crash leaves no half version behind.

- ``model.pth``: the reference-compatible pickle. ``torch.load(p, weights_only=False).module``
  is the quantized model, as CUDA-BEVFusion's export scripts expect.
- ``state_dict.pth``: plain tensors (``torch.load(weights_only=True)`` works), amax included.
- ``quantizers.json``: every quantizer's descriptor, share group, enabled state and amax (the
  status table; :func:`bevfusion_ptq.quant.load.load_quantized` reads it back).
- whatever the caller adds: JSON files (``extra_files``) and files written by ``write_extra``
  (plots), possibly in sub-directories.
- ``manifest.json``: ``version``, ``model``, ``created_at``, ``files`` [{name, size, sha256}] with
  ``/``-separated relative names, and what produced them.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import os
import shutil
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from bevfusion_ptq import __version__
from bevfusion_ptq.diskspace import disk_error, disk_errors
from bevfusion_ptq.hashing import file_sha256
from bevfusion_ptq.stable_save import save_stable

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class ExportedModel(nn.Module):
    """Holder whose ``.module`` is the model, matching the reference's MMDataParallel pickle."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


@dataclass(frozen=True)
class SavedVersion:
    """Where a version lives and its manifest; ``reused`` when it already existed."""

    path: Path
    manifest: dict
    reused: bool = False


def read_manifest(version_dir: Path) -> dict:
    return json.loads((version_dir / MANIFEST).read_text())


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_artifacts(
    model: nn.Module,
    quantizers: list[dict],
    out_root: str | Path,
    *,
    model_name: str,
    version: str,
    inputs: dict[str, Any],
    extra_files: dict[str, Any] | None = None,
    write_extra: Callable[[Path], None] | None = None,
    manifest_extra: dict[str, Any] | None = None,
) -> SavedVersion:
    """Write the version directory for ``model``; an existing complete one is reused.

    ``version`` is derived by the caller from the inputs, so an existing directory with a
    manifest holds exactly what this call would write, and re-running changes nothing.
    ``extra_files`` maps file names to JSON-able data (status tables, resolved configs);
    ``write_extra(dir)`` writes further files into the version directory before it is
    checksummed; ``manifest_extra`` adds keys to the manifest (provenance, fidelity summary).
    """
    model_dir = Path(out_root) / model_name
    final = model_dir / version
    if (final / MANIFEST).is_file():
        log.info("version %s already saved at %s; reusing it", version, final)
        return SavedVersion(final, read_manifest(final), reused=True)

    staging = model_dir / f".{version}.staging-{os.getpid()}"
    with disk_errors(model_dir, "write to"):
        model_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    try:
        cpu_model = copy.deepcopy(model).cpu().eval()
        save_stable(ExportedModel(cpu_model), staging / "model.pth")  # same model, same bytes and sha256
        save_stable(cpu_model.state_dict(), staging / "state_dict.pth")
        _write_json(staging / "quantizers.json", quantizers)
        for name, data in (extra_files or {}).items():
            _write_json(staging / name, data)
        if write_extra is not None:
            write_extra(staging)
        files = [
            {"name": p.relative_to(staging).as_posix(), "size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        ]
        manifest = {
            "version": version,
            "model": model_name,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "package_version": __version__,
            **(manifest_extra or {}),
            "inputs": inputs,
            "files": files,
        }
        _write_json(staging / MANIFEST, manifest)
        try:
            staging.rename(final)
        except OSError:
            if (final / MANIFEST).is_file():  # a concurrent identical run finished first
                shutil.rmtree(staging, ignore_errors=True)
                return SavedVersion(final, read_manifest(final), reused=True)
            raise
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        named = disk_error(exc, final, "save the version")  # "disk full" / "read-only", one line
        if named is None:
            raise
        raise named from exc
    log.info("saved %d files to %s", len(files), final)
    return SavedVersion(final, manifest)
