"""``--calib-method auto``: per quantizer, the candidate amax that hurts its consumer least.

Candidates, all computed from the same collected histogram: mse, entropy, percentile at
99.9 / 99.99 / 99.999, and max (the largest value seen). They are judged on *held-out*
batches (samples the histograms never saw), by a measured error:

* **Consumer error** (quantizers feeding a layer with weights: convolutions, transposed
  convolutions, sparse convolutions): the squared error of that layer's output when its input
  is fake-quantized with the candidate amax and its weights with their own quantizer,
  against the layer's FP32 output on the same FP32 input. This is what the network feels:
  an input channel that meets small weights may be clipped harder than one that meets
  large weights, which the quantizer's own error cannot see. A quantizer shared by several
  layers sums their errors.
* **Own error** (quantizers feeding a weight-free operation: a residual add, a concat): the
  squared error of the fake-quantized tensor itself. An add or a concat passes its inputs on
  unchanged, so here the own error *is* the consumer's.

Why not the quantizer's own error everywhere: it is exactly the objective that ``mse``
minimises on the calibration histogram, so ``auto`` would mostly confirm ``mse`` and learn
nothing about what follows the quantizer. Why not the end metric (mAP, the head's output)
per quantizer: it needs a forward of the whole network per quantizer and candidate, and with
every other quantizer in float the end effect of one small error is noise. Judging each
quantizer with its upstream in FP32 keeps the choices independent, so one pass over the
held-out batches (the FP32 forward plus six re-runs of each quantized layer) decides all of
them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from pytorch_quantization import calib
from pytorch_quantization.nn import TensorQuantizer
from torch import Tensor, nn

from bevfusion_ptq.errors import CalibrationError
from bevfusion_ptq.quant import compat
from bevfusion_ptq.quant.calibrate import default_forward

log = logging.getLogger(__name__)

PERCENTILES: tuple[float, ...] = (99.9, 99.99, 99.999)
#: attribute on a TensorQuantizer recording the choice (pickled with the model, read by the report)
CHOICE_ATTR = "_amax_choice"

Forward = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class AmaxChoice:
    """One quantizer's decision: the winner, its amax, and every candidate's error.

    ``errors`` are relative RMS errors (``sqrt(SSE / sum of squared FP32 values)``) of the
    criterion, per candidate; ``margin`` is how much lower the winner's is than the
    runner-up's (0.1: 10 % lower), ``vs_mse`` the same against the mse candidate.
    """

    winner: str
    amax: float
    criterion: str  # "consumer" or "own"
    errors: dict[str, float]
    candidates: dict[str, float]  # candidate -> amax
    margin: float
    vs_mse: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidate_amax(quantizer: TensorQuantizer, percentiles: Iterable[float] = PERCENTILES) -> dict[str, Tensor]:
    """Every candidate amax of a histogram quantizer, by name (``percentile-99.99`` ...)."""
    found: dict[str, Tensor] = {}
    for method in ("mse", "entropy"):
        found[method] = compat.compute_calibrator_amax(quantizer, method)
    for p in percentiles:
        found[f"percentile-{p:g}"] = compat.compute_calibrator_amax(quantizer, "percentile", percentile=p)
    found["max"] = compat.compute_calibrator_amax(quantizer, "max")
    return {name: value.detach().float().cpu().reshape(()) for name, value in found.items()}


def set_scalar_amax(quantizer: TensorQuantizer, value: Tensor | float, device: torch.device) -> None:
    """A per-tensor amax, in the shape the quantizer's buffer already has (if any)."""
    value = torch.as_tensor(value, dtype=torch.float32)
    existing = getattr(quantizer, "_amax", None)
    compat.set_amax(quantizer, value.reshape(existing.shape) if existing is not None else value, device)


@contextmanager
def _quant_state(quantizers: Iterable[TensorQuantizer]) -> Iterator[None]:
    """Put quantizer flags and amax back as they were, also on error."""
    saved = [(q, q._disabled, q._if_calib, q._if_quant, getattr(q, "_amax", None)) for q in quantizers]
    try:
        yield
    finally:
        for q, disabled, if_calib, if_quant, amax in saved:
            q._disabled, q._if_calib, q._if_quant = disabled, if_calib, if_quant
            if amax is not None:
                q._amax = amax


def _features(value: Any) -> Tensor:
    """The dense tensor of a module output (a SparseConvTensor's features)."""
    return value.features if hasattr(value, "features") and not isinstance(value, Tensor) else value


class _Tally:
    """Running squared errors of each candidate, and the squared norm of the reference."""

    def __init__(self, names: Iterable[str]) -> None:
        self.sse = {n: 0.0 for n in names}
        self.ref = 0.0

    def add(self, name: str, q: Tensor, f: Tensor) -> None:
        diff = (q.detach().double() - f.detach().double())
        self.sse[name] += float(diff.pow(2).sum())

    def relative(self) -> dict[str, float]:
        """sqrt(SSE / reference energy); the plain root SSE when the reference is all zeros."""
        scale = self.ref if self.ref > 0 else 1.0
        return {n: math.sqrt(v / scale) for n, v in self.sse.items()}


def choose_amax(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    *,
    percentiles: Iterable[float] = PERCENTILES,
    forward: Forward = default_forward,
) -> dict[str, AmaxChoice]:
    """Pick each histogram quantizer's amax among the candidates, on held-out batches.

    The calibrators must hold their statistics (after collection or an imported state) and
    every max quantizer (weights) its amax. Sets each histogram quantizer's amax to the
    winner and records the :class:`AmaxChoice` on it (``_amax_choice``); returns them by
    quantizer path. Runs with every quantizer off except inside the re-runs of one layer.
    """
    if num_batches < 1:
        raise CalibrationError(f"auto calibration needs at least 1 held-out batch, got {num_batches}")
    named = [(n, q) for n, q in compat.iter_quantizers(model) if isinstance(getattr(q, "_calibrator", None), calib.HistogramCalibrator)]
    if not named:
        raise CalibrationError("auto calibration: the model has no histogram quantizer")
    cands: dict[int, dict[str, Tensor]] = {}
    for name, q in named:
        if q._calibrator._calib_hist is None:
            raise CalibrationError(f"auto calibration: quantizer {name} saw no data during collection")
        cands[id(q)] = candidate_amax(q, percentiles)
    methods = list(next(iter(cands.values())))
    tallies = {id(q): _Tally(methods) for _, q in named}
    consumers: dict[int, list[nn.Module]] = {}
    for _, module in model.named_modules():
        q = getattr(module, "_input_quantizer", None)
        w = getattr(module, "_weight_quantizer", None)
        if isinstance(q, TensorQuantizer) and isinstance(w, TensorQuantizer) and id(q) in tallies:
            consumers.setdefault(id(q), []).append(module)
    device = compat.model_device(model)
    all_quantizers = [q for _, q in compat.iter_quantizers(model)]
    busy = False

    def set_candidate(q: TensorQuantizer, value: Tensor) -> None:
        set_scalar_amax(q, value, device)
        q._disabled, q._if_quant, q._if_calib = False, True, False

    def consumer_hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        nonlocal busy
        if busy:
            return
        q, w = module._input_quantizer, module._weight_quantizer
        tally, reference = tallies[id(q)], _features(output)
        tally.ref += float(reference.detach().double().pow(2).sum())
        busy = True
        try:
            w._disabled, w._if_quant = False, True
            for method, value in cands[id(q)].items():
                set_candidate(q, value)
                tally.add(method, _features(module.forward(*inputs)), reference)
        finally:
            q._disabled = w._disabled = True
            busy = False

    def own_hook(q: TensorQuantizer, inputs: tuple, output: Any) -> None:
        nonlocal busy
        if busy:
            return
        x = inputs[0]
        tally = tallies[id(q)]
        tally.ref += float(x.detach().double().pow(2).sum())
        busy = True
        try:
            for method, value in cands[id(q)].items():
                set_candidate(q, value)
                tally.add(method, q(x), x)
        finally:
            q._disabled = True
            busy = False

    hooks = []
    started = time.perf_counter()
    with _quant_state(all_quantizers), torch.no_grad():
        for q in all_quantizers:
            q._disabled, q._if_calib = True, False
        try:
            for _, module in model.named_modules():
                q = getattr(module, "_input_quantizer", None)
                if q is not None and id(q) in consumers and module in consumers[id(q)]:
                    hooks.append(module.register_forward_hook(consumer_hook))
            for _, q in named:
                if id(q) not in consumers:
                    hooks.append(q.register_forward_hook(own_hook))
            model.eval()
            seen = 0
            for batch in batches:
                if seen >= num_batches:
                    break
                forward(model, batch)
                seen += 1
        finally:
            for h in hooks:
                h.remove()
    if seen < num_batches:
        raise CalibrationError(f"auto calibration asked for {num_batches} held-out batches, the data gave {seen}")
    choices: dict[str, AmaxChoice] = {}
    for name, q in named:
        errors = tallies[id(q)].relative()
        order = sorted(methods, key=lambda m: (errors[m], methods.index(m)))
        best, runner_up = order[0], order[1]

        def lower(than: float, best_err: float = errors[best]) -> float:
            return 0.0 if than == 0 or not math.isfinite(than) else (than - best_err) / than

        choice = AmaxChoice(
            winner=best,
            amax=float(cands[id(q)][best]),
            criterion="consumer" if id(q) in consumers else "own",
            errors={m: errors[m] for m in methods},
            candidates={m: float(v) for m, v in cands[id(q)].items()},
            margin=lower(errors[runner_up]),
            vs_mse=lower(errors["mse"]),
        )
        set_scalar_amax(q, cands[id(q)][best], device)
        setattr(q, CHOICE_ATTR, choice.as_dict())
        choices[name] = choice
    wins: dict[str, int] = {}
    for c in choices.values():
        wins[c.winner] = wins.get(c.winner, 0) + 1
    log.info(
        "auto calibration on %d held-out batches in %.1f s: %s", seen, time.perf_counter() - started,
        ", ".join(f"{m} {n}" for m, n in sorted(wins.items(), key=lambda kv: -kv[1])),
    )
    return choices
