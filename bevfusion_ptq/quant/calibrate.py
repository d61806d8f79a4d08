"""Calibration: collect activation statistics, then turn them into amax values.

The caller owns the data: ``calibrate`` only asks for an iterable of batches and, if the
model is not a BEVFusion, a function that runs one batch through the quantized part.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pytorch_quantization.nn import TensorQuantizer
from torch import nn

from bevfusion_ptq.data.batch import move_batch
from bevfusion_ptq.errors import CalibrationError
from bevfusion_ptq.quant import compat

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
    batch = move_batch(batch, next(model.parameters()).device)
    run = getattr(model, "extract_features", None) or model
    return run(batch)


def _calibrated_quantizers(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    return [(n, q) for n, q in compat.iter_quantizers(model) if getattr(q, "_calibrator", None) is not None]


@contextmanager
def _finite_check(quantizers: list[tuple[str, TensorQuantizer]], batch: list[int]) -> Iterator[None]:
    """Fail at the first non-finite tensor a calibrator would see, naming quantizer and batch.

    A NaN or inf poisons a histogram for good (every later amax is garbage), and
    pytorch-quantization only fails much later with an unrelated range error, if at all.
    """

    def check(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if isinstance(x, torch.Tensor) and not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).sum())
                raise CalibrationError(
                    f"non-finite activations at quantizer {name} in calibration batch {batch[0]} "
                    f"({bad} of {x.numel()} values are NaN or inf)"
                )

        return hook

    handles = [q.register_forward_pre_hook(check(name)) for name, q in quantizers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
    forward); we stop at ``num_batches``. ``start`` > 0 continues an imported calibration
    state: ``batches`` then yields only the batches not seen yet. ``progress(seen, total)``
    runs after every batch (the orchestration checkpoints from it). Returns the number of
    batches seen in total.
    """
    quantizers = _calibrated_quantizers(model)
    for _, q in quantizers:
        q.disable_quant()
        q.enable_calib()
    model.eval()
    started = time.perf_counter()
    seen = start
    current = [start]
    every = max(1, num_batches // 10)
    try:
        with torch.no_grad(), _finite_check(quantizers, current):
            for batch in batches:
                if seen >= num_batches:
                    break
                current[0] = seen
                forward(model, batch)
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
            q.disable_calib()
            q.enable_quant()
    return seen


def compute_amax(
    model: nn.Module, method: str = "mse", *, percentile: float = 99.99
) -> dict[str, torch.Tensor]:
    """Load an amax into every calibrated quantizer; fail naming any that saw no data.

    The reference silently produced amax=None here and the export crashed much later.
    """
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    device = next(model.parameters()).device
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
