"""The compute-amax stage: amax from saved statistics, exclusions, ReLUs; no collection.

Its key is the collect-statistics key (model, data, batches) plus the method, the
percentile and the exclusions. Changing any of these re-runs only this stage and what
follows: the statistics file is imported into the fused model's calibrators
(:func:`~bevfusion_ptq.quant.calib_state.import_calibration_state`) and every amax is
recomputed from it, in seconds, without a forward pass.

``--calib-method auto`` measures its candidates on held-out batches (forwards of the
quantized layers, see :mod:`bevfusion_ptq.quant.auto_amax`); its choices are kept under
their own key (statistics + held-out set), so a later change of exclusions reuses them.
``--exclude auto:<target>`` disables the quantizers the sensitivity stage proposed.
"""

from __future__ import annotations

import json
import logging
import time

import torch

from bevfusion_ptq.errors import CalibrationError
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.collect_stage import load_statistics
from bevfusion_ptq.pipeline.heldout import heldout_identity, heldout_set
from bevfusion_ptq.pipeline.inputs import resolve_device
from bevfusion_ptq.pipeline.keys import stage_key
from bevfusion_ptq.pipeline.refs import DatasetRef, SensitivityRef, StageRef
from bevfusion_ptq.quant import compat
from bevfusion_ptq.quant.auto_amax import CHOICE_ATTR, choose_amax, set_scalar_amax
from bevfusion_ptq.quant.calib_state import import_calibration_state
from bevfusion_ptq.quant.calibrate import compute_amax
from bevfusion_ptq.quant.fold_relu import fold_relu
from bevfusion_ptq.quant.insert import apply_exclusions
from bevfusion_ptq.quant.sensitivity import disable_quantizers
from bevfusion_ptq.workdir import load_model, save_model, stage_dir

log = logging.getLogger(__name__)

STAGE = "compute_amax"
AUTO_DIR = "auto_amax"
CHOICES_FILE = "choices.json"


def _heldout(params: PTQParams, data: DatasetRef) -> dict | None:
    return heldout_identity(params, data) if params.calib_method == "auto" else None


def compute_amax_key(
    params: PTQParams, ref: StageRef, stats: StageRef, data: DatasetRef, sensitivity: SensitivityRef | None = None
) -> str:
    return stage_key(
        STAGE, compute_amax_stage, params, model=ref.key, statistics=stats.key, heldout=_heldout(params, data),
        sensitivity=None if sensitivity is None or params.auto_exclude_target is None else sensitivity.key,
    )


def _auto_key(ref: StageRef, stats: StageRef, heldout: dict) -> str:
    return stage_key(AUTO_DIR, choose_amax, None, model=ref.key, statistics=stats.key, heldout=heldout)


def _apply_auto(params: PTQParams, ref: StageRef, stats: StageRef, data: DatasetRef, model: torch.nn.Module) -> None:
    """Set the auto choices: measured once per statistics and held-out set, then read back."""
    heldout = heldout_identity(params, data)
    folder = stage_dir(AUTO_DIR, _auto_key(ref, stats, heldout))
    path = folder / CHOICES_FILE
    quantizers = dict(compat.iter_quantizers(model))
    if path.is_file():
        for name, choice in json.loads(path.read_text()).items():
            set_scalar_amax(quantizers[name], choice["amax"], torch.device("cpu"))
            setattr(quantizers[name], CHOICE_ATTR, choice)
        log.info("auto amax: reusing the choices measured before (%s)", path)
        return
    device = resolve_device(params.device)
    calib = heldout_set(params, data)
    model.to(device)
    try:
        choices = choose_amax(model, calib.loader(pin_memory=device.type == "cuda"), params.heldout_batches)
    finally:
        model.cpu()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps({n: c.as_dict() for n, c in choices.items()}, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def calibrated_model(params: PTQParams, ref: StageRef, stats: StageRef, data: DatasetRef) -> torch.nn.Module:
    """The fused model with the statistics imported and every amax set; nothing excluded.

    On the CPU: amax from a histogram is a few matrix operations per quantizer. ``auto``
    starts from max (the cheapest: weights take their max either way, and every histogram
    quantizer's amax is then replaced by its measured choice).
    """
    model = load_model(ref).eval()
    seen = import_calibration_state(model, load_statistics(stats), torch.device("cpu"))
    if seen != len(data.tokens):  # the dataset stage settled the count (a default may be capped)
        raise CalibrationError(f"statistics {stats.path} hold {seen} batches, the run asks for {len(data.tokens)}")
    auto = params.calib_method == "auto"
    compute_amax(model, "max" if auto else params.calib_method, percentile=params.percentile)
    if auto:
        _apply_auto(params, ref, stats, data, model)
    return model


def compute_amax_stage(
    params: PTQParams, ref: StageRef, stats: StageRef, data: DatasetRef, sensitivity: SensitivityRef | None = None
) -> StageRef:
    """Amax by ``calib_method`` from the collected statistics, exclusions off, ReLUs recorded."""
    key = compute_amax_key(params, ref, stats, data, sensitivity)
    began = time.perf_counter()
    model = calibrated_model(params, ref, stats, data)
    disabled = apply_exclusions(model, tuple(params.exclude_patterns))
    if params.auto_exclude_target is not None:
        if sensitivity is None or sensitivity.target != params.auto_exclude_target:
            raise CalibrationError(
                f"--exclude auto:{params.auto_exclude_target:g} needs the sensitivity analysis for that target"
            )
        disabled += disable_quantizers(model, sensitivity.exclude_quantizers)
        log.info("auto exclusions for a drop <= %g: %s", sensitivity.target, ", ".join(sensitivity.exclude_groups) or "none")
    relu = fold_relu(model)
    seconds = time.perf_counter() - began
    log.info("amax by %s for every quantizer in %.2f s (no collection)", params.calib_method, seconds)
    made_from = {
        "model": ref.key,
        "statistics": stats.key,
        "method": params.calib_method,
        "batches": len(data.tokens),
        "resumed_from": stats.made_from.get("resumed_from", 0),
        "collected": stats.made_from.get("collected", len(data.tokens)),
        "disabled": len(disabled),
        "auto_excluded": [] if sensitivity is None or params.auto_exclude_target is None else sensitivity.exclude_groups,
        "relu_folded": len(relu),
        "seconds": round(seconds, 3),
    }
    return save_model(model, STAGE, key, made_from)
