"""The fidelity stage: INT8 fake-quant against FP32 on a few batches of the calibration set."""

from __future__ import annotations

import json
import logging

from bevfusion_ptq.atomic import write_text
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.inputs import open_calibration_set, resolve_device
from bevfusion_ptq.pipeline.keys import stage_key
from bevfusion_ptq.pipeline.refs import DatasetRef, FidelityRef, StageRef
from bevfusion_ptq.progress import track
from bevfusion_ptq.quant.fidelity import fidelity_report
from bevfusion_ptq.workdir import load_model, stage_dir

log = logging.getLogger(__name__)

REPORT_FILE = "fidelity.json"


def fidelity_key(params: PTQParams, ref: StageRef, data: DatasetRef) -> str:
    return stage_key("fidelity", fidelity_stage, params, model=ref.key, data=data.fingerprint)


def fidelity_stage(params: PTQParams, ref: StageRef, data: DatasetRef) -> FidelityRef:
    """Report on ``min(fidelity_batches, calibration batches)`` samples; 0 switches it off."""
    key = fidelity_key(params, ref, data)
    if params.fidelity_batches == 0:
        return FidelityRef(key=key, path=None, summary={}, markdown="Fidelity report switched off (--fidelity-batches 0).")
    calib = open_calibration_set(params, data)
    batches = min(params.fidelity_batches, len(calib))
    if batches < params.fidelity_batches:
        log.warning("fidelity report on %d batches: the calibration set has only %d", batches, len(calib))
    device = resolve_device(params.device)
    model = load_model(ref).to(device).eval()
    loader = track(calib.loader(pin_memory=device.type == "cuda"), batches, "fidelity")
    report = fidelity_report(model, loader, num_batches=batches)
    path = stage_dir("fidelity", key) / REPORT_FILE
    write_text(path, json.dumps(report.as_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n")
    return FidelityRef(key=key, path=str(path), summary=report.summary(), markdown=report.markdown())
