"""The calibrate stage: collect, compute amax, disable exclusions, record ReLUs, and resume.

Calibration is the long step, on pre-emptible GPU workers. Every few minutes (or every
``calib_checkpoint_every`` batches) the calibrators' state is saved next to the stage's
output, under the stage's cache key; a retry, or a later run with the same inputs, imports
it and collects only the remaining batches. The amax is the same as an uninterrupted run's:
the histograms are the same sums of the same batches.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch
from torch import nn

from bevfusion_ptq.diskspace import disk_errors
from bevfusion_ptq.interrupts import stop_between_batches
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.inputs import open_calibration_set, resolve_device
from bevfusion_ptq.pipeline.keys import stage_key
from bevfusion_ptq.pipeline.refs import DatasetRef, StageRef
from bevfusion_ptq.quant.calib_state import export_calibration_state, import_calibration_state
from bevfusion_ptq.quant.calibrate import ProgressFn, calibrate
from bevfusion_ptq.quant.fold_relu import fold_relu
from bevfusion_ptq.quant.insert import apply_exclusions
from bevfusion_ptq.workdir import load_model, save_model, stage_dir

log = logging.getLogger(__name__)

STATE_FILE = "calibration-state.pt"
CHECKPOINT_SECONDS = 120.0


class InjectedFault(RuntimeError):
    """Raised on purpose (``BEVFUSION_PTQ_FAIL_AT_BATCH``) to prove that calibration resumes."""


class CalibrationInterrupted(TimeoutError):
    """The stage's time budget ran out between two batches; its state was saved first."""


class _Checkpointer:
    """Saves the calibration state atomically, every ``every`` batches or ``seconds``."""

    def __init__(self, model: nn.Module, path: Path, every: int, seconds: float = CHECKPOINT_SECONDS):
        self.model, self.path, self.every, self.seconds = model, path, every, seconds
        self.last = time.monotonic()
        self.saved_at = 0

    def due(self, seen: int) -> bool:
        if self.every:
            return seen % self.every == 0
        return time.monotonic() - self.last >= self.seconds

    def save(self, seen: int) -> None:
        tmp = self.path.with_name(f".{self.path.name}.partial")
        try:
            with disk_errors(self.path, "save the calibration state"):
                torch.save(export_calibration_state(self.model, seen), tmp)
                tmp.replace(self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self.last, self.saved_at = time.monotonic(), seen
        log.info("calibration state saved after batch %d to %s", seen, self.path)


def calibrate_key(params: PTQParams, ref: StageRef, data: DatasetRef) -> str:
    return stage_key("calibrate", calibrate_stage, params, model=ref.key, data=data.fingerprint)


def _free(device: torch.device) -> None:
    """Give the GPU memory of a failed attempt back before Prefect retries in this process."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def calibrate_stage(
    params: PTQParams,
    ref: StageRef,
    data: DatasetRef,
    *,
    progress: ProgressFn | None = None,
    fail_at_batch: int | None = None,
    deadline: float | None = None,
) -> StageRef:
    """Calibrate on the chosen samples, resuming from a saved state when one exists.

    ``fail_at_batch`` raises :class:`InjectedFault` right after that batch (tests of resume);
    ``deadline`` (``time.monotonic()`` value) stops cleanly between batches, state saved, so a
    timeout never loses more than one batch; so does a SIGINT or SIGTERM (see
    :mod:`bevfusion_ptq.interrupts`).
    """
    key = calibrate_key(params, ref, data)
    folder = stage_dir("calibrate", key)
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / STATE_FILE
    device = resolve_device(params.device)
    total = len(data.tokens)  # the dataset stage settled the count (a default may be capped)
    try:
        model = load_model(ref).to(device).eval()
        start = 0
        if state_path.is_file():
            state = torch.load(state_path, map_location=device, weights_only=True)
            start = import_calibration_state(model, state, device)
            log.info("resuming calibration at batch %d of %d from %s", start, total, state_path)
        calib = open_calibration_set(params, data)
        loader = calib.loader(pin_memory=device.type == "cuda", start=start)
        checkpointer = _Checkpointer(model, state_path, params.calib_checkpoint_every)
        checkpointer.saved_at = start

        def after_batch(seen: int, of: int) -> None:
            if stop.requested is not None:  # Ctrl-C or SIGTERM during this batch
                checkpointer.save(seen)
                log.warning("calibration stopped after batch %d of %d; the same command resumes from there", seen, of)
                stop.hand_on()
            if seen < of and checkpointer.due(seen):
                checkpointer.save(seen)
            if progress is not None:
                progress(seen, of)
            if fail_at_batch is not None and seen == fail_at_batch:
                raise InjectedFault(
                    f"injected failure after calibration batch {seen} (last saved state: batch {checkpointer.saved_at})"
                )
            if deadline is not None and seen < of and time.monotonic() > deadline:
                checkpointer.save(seen)
                raise CalibrationInterrupted(f"calibration ran out of time after batch {seen} of {of}; state saved")

        log.info("calibrating %d batches on %s with method %s", total, device, params.calib_method)
        with stop_between_batches() as stop:
            result = calibrate(
                model, loader, method=params.calib_method, num_batches=total,
                percentile=params.percentile, progress=after_batch, start=start,
            )
        disabled = apply_exclusions(model, tuple(params.exclude))
        relu = fold_relu(model)
    except BaseException:
        model = None  # noqa: F841 - drop the reference before freeing
        _free(device)
        raise
    made_from = {
        "model": ref.key,
        "data": data.fingerprint,
        "method": params.calib_method,
        "batches": total,
        "resumed_from": result.resumed_from,
        "collected": total - result.resumed_from,
        "disabled": len(disabled),
        "relu_folded": len(relu),
        "seconds": round(result.seconds, 3),
        "device": str(device),
    }
    saved = save_model(model.cpu(), "calibrate", key, made_from)
    state_path.unlink(missing_ok=True)
    return saved

