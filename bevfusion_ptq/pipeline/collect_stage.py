"""The collect-statistics stage: one forward per batch, histograms and maxima saved as a file.

Collection is the expensive half of calibration (a forward per batch); turning statistics
into amax is cheap. So this stage's key is only the model, the data and the batch count: a
run that changes ``--calib-method``, ``--percentile`` or ``--exclude`` finds the statistics
cached and runs no forward at all (:mod:`.amax_stage` decides from them).

The statistics file is :mod:`bevfusion_ptq.quant.calib_state`'s format, the same dict the
resume checkpoints hold, with ``batches_seen`` equal to the batch count. Every few minutes
(or every ``calib_checkpoint_every`` batches) the state is saved next to the stage's output,
under the stage's key; a retry, or a later run with the same inputs, imports it and collects
only the remaining batches. The statistics are the same as an uninterrupted run's: the
histograms are the same sums of the same batches.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch
from torch import nn

from bevfusion_ptq.diskspace import disk_errors
from bevfusion_ptq.errors import CalibrationError
from bevfusion_ptq.hashing import file_sha256
from bevfusion_ptq.interrupts import stop_between_batches
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.inputs import open_calibration_set, resolve_device
from bevfusion_ptq.pipeline.keys import stage_key
from bevfusion_ptq.pipeline.refs import DatasetRef, StageRef
from bevfusion_ptq.quant.calib_state import export_calibration_state, import_calibration_state
from bevfusion_ptq.quant.calibrate import ProgressFn, collect
from bevfusion_ptq.workdir import load_model, stage_dir, verified_path

log = logging.getLogger(__name__)

STAGE = "collect_statistics"
STATE_FILE = "calibration-state.pt"  # the resume checkpoint while collecting
STATISTICS_FILE = "statistics.pt"  # the finished statistics, same format
CHECKPOINT_SECONDS = 120.0


class InjectedFault(RuntimeError):
    """Raised on purpose (``BEVFUSION_PTQ_FAIL_AT_BATCH``) to prove that calibration resumes."""


class CalibrationInterrupted(TimeoutError):
    """The stage's time budget ran out between two batches; its state was saved first."""


def save_state(model: nn.Module, path: Path, batches_seen: int) -> None:
    """Write the calibrators' state atomically (a crash never leaves half a file)."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with disk_errors(path, "save the calibration state"):
            torch.save(export_calibration_state(model, batches_seen), tmp)
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


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
        save_state(self.model, self.path, seen)
        self.last, self.saved_at = time.monotonic(), seen
        log.info("calibration state saved after batch %d to %s", seen, self.path)


def collect_statistics_key(params: PTQParams, ref: StageRef, data: DatasetRef) -> str:
    return stage_key(STAGE, collect_statistics_stage, params, model=ref.key, data=data.fingerprint)


def statistics_path(params: PTQParams, ref: StageRef, data: DatasetRef) -> Path:
    return stage_dir(STAGE, collect_statistics_key(params, ref, data)) / STATISTICS_FILE


def load_statistics(stats: StageRef) -> dict:
    """The statistics file of a collect-statistics output, refusing one that changed since."""
    return torch.load(verified_path(stats, CalibrationError), map_location="cpu", weights_only=True)


def _free(device: torch.device) -> None:
    """Give the GPU memory of a failed attempt back before Prefect retries in this process."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def collect_statistics_stage(
    params: PTQParams,
    ref: StageRef,
    data: DatasetRef,
    *,
    progress: ProgressFn | None = None,
    fail_at_batch: int | None = None,
    deadline: float | None = None,
) -> StageRef:
    """Collect histograms and maxima on the chosen samples, resuming from a saved state.

    ``ref`` is the model with quantizers inserted and BN fused. Returns a descriptor of
    ``statistics.pt``. ``fail_at_batch`` raises :class:`InjectedFault` right after that
    batch (tests of resume); ``deadline`` (``time.monotonic()`` value) stops cleanly between
    batches, state saved, so a timeout never loses more than one batch; so does a SIGINT or
    SIGTERM (see :mod:`bevfusion_ptq.interrupts`).
    """
    key = collect_statistics_key(params, ref, data)
    folder = stage_dir(STAGE, key)
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / STATE_FILE
    device = resolve_device(params.device)
    total = len(data.tokens)  # the dataset stage settled the count (a default may be capped)
    began = time.perf_counter()
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

        if not 0 <= start <= total:
            raise CalibrationError(f"saved calibration state is at batch {start}, beyond the {total} asked for")
        log.info("collecting calibration statistics on %d batches on %s", total, device)
        with stop_between_batches() as stop:
            seen = collect(model, loader, total, progress=after_batch, start=start)
        if seen < total:
            raise CalibrationError(f"asked for {total} calibration batches, the data gave {seen}")
        path = folder / STATISTICS_FILE
        save_state(model, path, seen)
    except BaseException:
        model = None  # noqa: F841 - drop the reference before freeing
        _free(device)
        raise
    made_from = {
        "model": ref.key,
        "data": data.fingerprint,
        "batches": total,
        "resumed_from": start,
        "collected": total - start,
        "seconds": round(time.perf_counter() - began, 3),
        "device": str(device),
    }
    saved = StageRef(stage=STAGE, key=key, path=str(path), sha256=file_sha256(path), made_from=made_from)
    (folder / "stage.json").write_text(saved.model_dump_json(indent=2) + "\n")  # for people and tests
    state_path.unlink(missing_ok=True)
    return saved
