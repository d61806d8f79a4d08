"""The export stage: the deployment ONNX set of the calibrated model, in the work directory.

Cached by the calibrated model's key, the export options (``--export``) and the sample batch
that fixes the static shapes (the first of the calibration set); the save stage copies the
files into the version directory, so they are published and listed in the manifest.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from bevfusion_ptq.export import export_deployment
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.inputs import open_calibration_set
from bevfusion_ptq.pipeline.keys import stage_key
from bevfusion_ptq.pipeline.refs import DatasetRef, ExportRef, StageRef
from bevfusion_ptq.workdir import load_model, stage_dir

log = logging.getLogger(__name__)

SUMMARY = "export.json"


def export_key(params: PTQParams, calibrated: StageRef, data: DatasetRef) -> str:
    return stage_key("export", export_stage, params, model=calibrated.key, data=data.fingerprint)


def export_present(params: PTQParams, calibrated: StageRef, data: DatasetRef) -> bool:
    return not params.export or (stage_dir("export", export_key(params, calibrated, data)) / SUMMARY).is_file()


def export_stage(params: PTQParams, calibrated: StageRef, data: DatasetRef) -> ExportRef:
    """Write ``onnx_<precision>/`` for each ``params.export`` precision and ``deploy.md``.

    The files appear complete or not at all: they are written into a staging folder that is
    renamed into place once every graph passed its checks.
    """
    key = export_key(params, calibrated, data)
    if not params.export:
        return ExportRef(key=key, path=None, files=[])
    folder = stage_dir("export", key)
    if (folder / SUMMARY).is_file():
        return ExportRef(key=key, path=str(folder), files=json.loads((folder / SUMMARY).read_text()))
    model = load_model(calibrated).cpu().eval()
    batch = next(iter(open_calibration_set(params, data).loader(num_workers=0, pin_memory=False)))
    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    written = export_deployment(model, batch, staging, params.export, model_name=params.model_name)
    files = [
        {**info.as_dict(), "path": Path(info.path).relative_to(staging).as_posix()} for info in written
    ]
    (staging / SUMMARY).write_text(json.dumps(files, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)
    log.info("exported %d deployment files (%s)", len(files), ", ".join(params.export))
    return ExportRef(key=key, path=str(folder), files=files)


def copy_export(exported: ExportRef | None, version_folder: Path) -> None:
    """Put the exported files (without the stage's own summary) into a version directory."""
    if exported is None or exported.path is None:
        return
    source = Path(exported.path)
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.name != SUMMARY:
            target = version_folder / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
