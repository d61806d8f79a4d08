"""Calibration: collect activation statistics, then turn them into amax values.

The caller owns the data: ``calibrate`` only asks for an iterable of batches and, if the
model is not a BEVFusion, a function that runs one batch through the quantized part.

Calibration is the step users wait for on a GPU, so collection is arranged to cost about
one forward pass per batch (``bench/calibration.py`` measures it):

* the forward stops at the decoder (:func:`default_forward`);
* the calibrators are sync-free twins of pytorch-quantization's
  (:mod:`bevfusion_ptq.quant.histogram`). The host reads their state once per batch, to
  catch non-finite activations (naming quantizer and batch) and to size histogram buffers;
* on CUDA, the next batch is copied to the device on a side stream while the current one
  runs, cuDNN picks its fastest algorithms for the fixed calibration shapes
  (``cudnn.benchmark``), and TF32 is off: convolutions compute in full FP32, so the
  statistics do not depend on a precision switch (nobody has shown that TF32 leaves the
  amax unchanged).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pytorch_quantization.nn import TensorQuantizer
from torch import nn

from bevfusion_ptq.data.batch import move_batch
from bevfusion_ptq.errors import CalibrationError
from bevfusion_ptq.quant import compat
from bevfusion_ptq.quant.histogram import CollectSession

log = logging.getLogger(__name__)

Method = Literal["mse", "percentile", "entropy", "max"]
METHODS: tuple[str, ...] = ("mse", "percentile", "entropy", "max")
Forward = Callable[[nn.Module, Any], Any]
ProgressFn = Callable[[int, int], None]


@dataclass
class CalibrationResult:
    """What calibration decided, as plain data (paths -> amax tensors on the CPU)."""

    method: str
    num_batches: int
    amax: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    resumed_from: int = 0  # batches restored from a calibration state instead of collected


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Move a batch dict to the model's device and run only what carries quantizers.

    BEVFusion's ``extract_features`` stops at the decoder: nothing after it is quantized, so
    running the detection head during calibration would be wasted work.
    """
    batch = move_batch(batch, compat.model_device(model))
    run = getattr(model, "extract_features", None) or model
    return run(batch)


def _calibrated_quantizers(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    return [(n, q) for n, q in compat.iter_quantizers(model) if getattr(q, "_calibrator", None) is not None]


@contextmanager
def calibration_backends(device: torch.device, *, benchmark: bool = True) -> Iterator[None]:
    """cuDNN autotuning (``benchmark``) and TF32 off while collecting on CUDA; the caller's
    flags after.

    Calibration batches all have one shape, so cuDNN's benchmark pays for itself on the
    first batch. TF32 (on by default for cuDNN convolutions) would round every convolution's
    inputs to 10 mantissa bits and move the activation statistics with a global switch.
    """
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved


class _Staged:
    """A batch whose copy to the device was started on a side stream."""

    def __init__(self, batch: Any, event: Any) -> None:
        self.batch, self.event = batch, event

    def ready(self, device: torch.device) -> Any:
        """Make the compute stream wait for the copy (on the device, not the host)."""
        if self.event is not None:
            stream = torch.cuda.current_stream(device)
            stream.wait_event(self.event)
            for value in self.batch.values():
                for tensor in value if isinstance(value, list) else [value]:
                    if isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda":
                        tensor.record_stream(stream)  # the allocator must not reuse it early
            self.event = None
        return self.batch


def _pinned(value: Any) -> Any:
    """Page-locked copy of host tensors, so the device copy is truly asynchronous."""
    if isinstance(value, torch.Tensor):
        return value if value.device.type != "cpu" or value.is_pinned() else value.pin_memory()
    if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
        return [_pinned(v) for v in value]
    return value


class _Stager:
    """Starts the host-to-device copy of dict batches on a side stream (CUDA only).

    The copy of batch i+1 is issued right after batch i's forward returned, so it overlaps
    the tail of that forward on the GPU instead of delaying the next one. Other batches,
    and every batch on the CPU, pass through untouched for ``forward`` to handle.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, batch: Any) -> _Staged:
        if self.stream is None or not isinstance(batch, Mapping):
            return _Staged(batch, None)
        with torch.cuda.stream(self.stream):
            moved = move_batch({k: _pinned(v) for k, v in batch.items()}, self.device)
            event = torch.cuda.Event()
            event.record(self.stream)
        return _Staged(moved, event)


# A batch is collected again only for histograms that outgrew their buffers; a second
# overflow of the same batch would need nondeterministic activations.
_MAX_REDO = 3


def collect(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    *,
    forward: Forward = default_forward,
    progress: ProgressFn | None = None,
    start: int = 0,
) -> int:
    """Feed batches ``start .. num_batches-1`` with quantization off and calibrators on.

    The reference's loop runs one batch more than asked (it checks the count after the
    forward); we stop at ``num_batches`` and take no more than that from ``batches``.
    ``start`` > 0 continues an imported calibration state: ``batches`` then yields only the
    batches not seen yet. ``progress(seen, total)`` runs after every batch, once that
    batch's statistics are checked (the orchestration checkpoints from it). Returns the
    number of batches seen in total.

    Non-finite activations fail with :class:`CalibrationError` naming the first quantizer
    (in forward order) that saw them and the batch, before ``progress`` hears of that batch:
    a NaN or inf poisons a histogram for good, and pytorch-quantization would only fail much
    later with an unrelated range error, if at all.
    """
    quantizers = _calibrated_quantizers(model)
    device = compat.model_device(model)
    # The flags themselves, not TensorQuantizer's enable/disable methods: those log a line per
    # call through absl (a warning per quantizer for disable_calib), 816 records per collect.
    for _, q in quantizers:
        q._if_quant, q._if_calib = False, True
    model.eval()
    started = time.perf_counter()
    seen = start
    every = max(1, num_batches // 10)
    stage = _Stager(device)
    source = iter(itertools.islice(batches, max(0, num_batches - start)))
    try:
        first = next(source, None)
        staged = None if first is None else stage(first)  # its copy overlaps the session's set-up
        with torch.no_grad(), calibration_backends(device), CollectSession(quantizers, device) as session:
            while staged is not None:
                batch = staged.ready(device)
                session.begin_batch()
                forward(model, batch)
                # Start the next copy now: it overlaps the tail of this forward.
                following = next(source, None) if seen + 1 < num_batches else None
                staged = None if following is None else stage(following)
                redo = session.end_batch(seen)
                for _ in range(_MAX_REDO):
                    if not redo:
                        break
                    session.prepare_redo(redo)
                    try:
                        forward(model, batch)
                    finally:
                        session.finish_redo()
                    redo = session.end_batch(seen)
                if redo:
                    raise CalibrationError(f"histogram buffers kept overflowing in calibration batch {seen}")
                seen += 1
                if seen == num_batches or seen % every == 0:
                    elapsed = time.perf_counter() - started
                    rate = (seen - start) / elapsed if elapsed > 0 else float("inf")
                    eta = (num_batches - seen) / rate if rate > 0 else float("nan")
                    log.info("calibration batch %d/%d, %.2f batch/s, ETA %.0f s", seen, num_batches, rate, eta)
                if progress is not None:
                    progress(seen, num_batches)
    finally:
        for _, q in quantizers:
            q._if_calib, q._if_quant = False, True
    return seen


def compute_amax(
    model: nn.Module, method: str = "mse", *, percentile: float = 99.99
) -> dict[str, torch.Tensor]:
    """Load an amax into every calibrated quantizer; fail naming any that saw no data.

    The reference silently produced amax=None here and the export crashed much later.
    """
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    device = compat.model_device(model)
    result: dict[str, torch.Tensor] = {}
    empty: list[str] = []
    for name, q in _calibrated_quantizers(model):
        amax = compat.load_calib_amax(q, method, device, percentile=percentile)
        if amax is None:
            empty.append(name)
        else:
            result[name] = amax.detach().cpu()
    if empty:
        raise CalibrationError(
            f"{len(empty)} quantizer(s) saw no data during calibration: {', '.join(empty[:20])}"
        )
    return result


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    method: str = "mse",
    num_batches: int,
    percentile: float = 99.99,
    forward: Forward = default_forward,
    progress: ProgressFn | None = None,
    start: int = 0,
) -> CalibrationResult:
    """Collect ``num_batches`` batches, then compute every quantizer's amax with ``method``.

    Histogram quantizers (activations) use ``method``; max quantizers (weights) always take
    their per-channel max. Fails when fewer batches were available than asked for.
    ``start`` continues a calibration whose state was imported after ``start`` batches (see
    :mod:`bevfusion_ptq.quant.calib_state`); the amax is the same as an uninterrupted run's.
    """
    if num_batches < 1:
        raise CalibrationError(f"num_batches must be >= 1, got {num_batches}")
    if not 0 <= start <= num_batches:
        raise CalibrationError(f"cannot continue at batch {start} of {num_batches}")
    began = time.perf_counter()
    seen = collect(model, batches, num_batches, forward=forward, progress=progress, start=start)
    if seen < num_batches:
        raise CalibrationError(f"asked for {num_batches} calibration batches, the data gave {seen}")
    amax = compute_amax(model, method, percentile=percentile)
    return CalibrationResult(method, seen, amax, time.perf_counter() - began, resumed_from=start)
