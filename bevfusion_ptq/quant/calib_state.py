"""Calibration state as plain tensors, so that a calibration can stop and resume exactly.

Collecting 300+ batches through BEVFusion takes a while on a GPU, and a crash (or a spot
machine taken back) should not throw the statistics away. pytorch-quantization keeps them in
private attributes of its calibrators; this module copies them out as a dict of CPU tensors,
ints, bools and strings (loadable with ``torch.load(..., weights_only=True)``) and puts them
back, so that continuing the collection gives bit-identical histograms and running maxima,
hence identical amax, to an uninterrupted run.

What is kept per calibrator:

* ``HistogramCalibrator``: the histogram, its bin edges and the current bin count (it grows
  when larger values arrive), plus the settings that change how later batches are binned
  (``torch_hist``, ``skip_zeros``), which are checked on import rather than restored.
* ``MaxCalibrator``: the running absolute maximum (per channel when the calibrator has an
  axis). The debugging list ``_amaxs`` of ``track_amax=True`` is not kept.
* ``batches_seen``: supplied by the caller, who counts model batches. A calibrator cannot
  count them itself: a shared quantizer (concat inputs, residual groups) is fed several
  times per batch. Import returns it, so the caller knows where to resume.

Quantizers are keyed by their module path as ``named_modules()`` yields it, which lists a
shared quantizer once, under its first path; the same model structure gives the same keys.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Union

import numpy as np
import torch
from pytorch_quantization import calib
from pytorch_quantization.nn import TensorQuantizer
from torch import Tensor, nn

from bevfusion_ptq.errors import CalibrationError
from bevfusion_ptq.quant import compat

log = logging.getLogger(__name__)

STATE_VERSION = 1
KIND_HISTOGRAM = "histogram"
KIND_MAX = "max"

StateValue = Union[Tensor, int, bool, str]
CalibratorState = dict[str, StateValue]
Calibrator = Union[calib.HistogramCalibrator, calib.MaxCalibrator]


def _cpu_copy(value: Tensor | np.ndarray) -> Tensor:
    """A detached CPU copy: the calibrators update some tensors in place (``copy_``)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    return value.detach().to("cpu", copy=True)


def _state_device(calibrator: Calibrator) -> torch.device:
    """Where the calibrator's statistics live now (CPU when it has none yet)."""
    value = getattr(calibrator, "_calib_hist", None)
    if value is None:
        value = getattr(calibrator, "_calib_amax", None)
    return value.device if isinstance(value, Tensor) else torch.device("cpu")


def export_calibrator_state(calibrator: Calibrator, batches_seen: int = 0) -> CalibratorState:
    """Copy a calibrator's collected statistics into plain CPU tensors and scalars."""
    if isinstance(batches_seen, bool) or not isinstance(batches_seen, int) or batches_seen < 0:
        raise CalibrationError(f"batches_seen must be a non-negative int, got {batches_seen!r}")
    state: CalibratorState = {
        "version": STATE_VERSION,
        "num_bits": int(calibrator._num_bits),
        "unsigned": bool(calibrator._unsigned),
        "batches_seen": batches_seen,
    }
    if isinstance(calibrator, calib.HistogramCalibrator):
        state.update(
            kind=KIND_HISTOGRAM,
            num_bins=int(calibrator._num_bins),
            torch_hist=bool(calibrator._torch_hist),
            skip_zeros=bool(calibrator._skip_zeros),
        )
        if calibrator._calib_hist is not None:
            state["hist"] = _cpu_copy(calibrator._calib_hist)
            state["bin_edges"] = _cpu_copy(calibrator._calib_bin_edges)
    elif isinstance(calibrator, calib.MaxCalibrator):
        state["kind"] = KIND_MAX
        if calibrator._calib_amax is not None:
            state["amax"] = _cpu_copy(calibrator._calib_amax)
    else:
        raise CalibrationError(f"cannot export the state of a {type(calibrator).__name__}")
    return state


def _require(state: Mapping[str, Any], key: str, kind: type | tuple[type, ...], name: str) -> Any:
    if key not in state:
        raise CalibrationError(f"{name}: calibration state lacks {key!r}")
    value = state[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CalibrationError(f"{name}: calibration state field {key!r} has type {type(value).__name__}")
    return value


def _check_setting(state: Mapping[str, Any], key: str, actual: Any, kind: type, name: str) -> None:
    stored = _require(state, key, kind, name)
    if stored != actual:
        raise CalibrationError(f"{name}: state has {key}={stored!r}, the calibrator has {key}={actual!r}")


def _axes(axis: Any, ndim: int) -> set[int]:
    if axis is None:
        return set()
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return {a % ndim for a in axes} if ndim else set()


def _import_histogram(
    calibrator: calib.HistogramCalibrator, state: Mapping[str, Any], device: torch.device, name: str
) -> None:
    _check_setting(state, "torch_hist", bool(calibrator._torch_hist), bool, name)
    _check_setting(state, "skip_zeros", bool(calibrator._skip_zeros), bool, name)
    num_bins = _require(state, "num_bins", int, name)
    if num_bins < 1:
        raise CalibrationError(f"{name}: num_bins must be >= 1, got {num_bins}")
    if ("hist" in state) != ("bin_edges" in state):
        raise CalibrationError(f"{name}: calibration state must hold both 'hist' and 'bin_edges', or neither")
    if "hist" not in state:
        calibrator._calib_hist = None
        calibrator._calib_bin_edges = None
        calibrator._num_bins = num_bins
        return
    hist = _require(state, "hist", Tensor, name)
    edges = _require(state, "bin_edges", Tensor, name)
    if hist.dim() != 1 or edges.dim() != 1 or edges.numel() < 2:
        raise CalibrationError(
            f"{name}: histogram must be 1-D and bin edges 1-D with >= 2 entries, "
            f"got shapes {tuple(hist.shape)} and {tuple(edges.shape)}"
        )
    if calibrator._torch_hist:
        # torch.histc always makes exactly _num_bins bins; anything else is not this calibrator's.
        if hist.numel() != num_bins:
            raise CalibrationError(f"{name}: histogram has {hist.numel()} bins, num_bins says {num_bins}")
        if not hist.is_floating_point() or not edges.is_floating_point():
            raise CalibrationError(f"{name}: torch histogram and edges must be floating point")
        calibrator._calib_hist = hist.to(device, copy=True)
        calibrator._calib_bin_edges = edges.to(device, copy=True)
    else:
        if hist.numel() + 1 != edges.numel():
            raise CalibrationError(
                f"{name}: numpy histogram of {hist.numel()} bins needs {hist.numel() + 1} edges, got {edges.numel()}"
            )
        calibrator._calib_hist = hist.detach().cpu().numpy().copy()
        calibrator._calib_bin_edges = edges.detach().cpu().numpy().copy()
    calibrator._num_bins = num_bins


def _import_max(calibrator: calib.MaxCalibrator, state: Mapping[str, Any], device: torch.device, name: str) -> None:
    if "amax" not in state:
        calibrator._calib_amax = None
        return
    amax = _require(state, "amax", Tensor, name)
    if not amax.is_floating_point():
        raise CalibrationError(f"{name}: running max must be floating point, got {amax.dtype}")
    # reduce_amax keeps every non-axis dimension with size 1 (or squeezes to a scalar).
    axes = _axes(calibrator._axis, amax.dim())
    bad = [d for d in range(amax.dim()) if d not in axes and amax.shape[d] != 1]
    if bad:
        raise CalibrationError(
            f"{name}: running max of shape {tuple(amax.shape)} does not fit axis={calibrator._axis!r}"
        )
    current = calibrator._calib_amax
    if current is not None and current.shape != amax.shape:
        raise CalibrationError(
            f"{name}: running max has shape {tuple(amax.shape)}, the calibrator holds {tuple(current.shape)}"
        )
    calibrator._calib_amax = amax.to(device, copy=True)


def import_calibrator_state(
    calibrator: Calibrator,
    state: Mapping[str, Any],
    device: torch.device | str | None = None,
    *,
    name: str = "calibrator",
) -> int:
    """Replace a calibrator's statistics by ``state``; return the state's ``batches_seen``.

    The tensors go to ``device``, by default where the calibrator's statistics live now (CPU
    for a fresh one). Settings that shape later binning must match, and shapes must fit, or
    :class:`CalibrationError` names ``name`` and the offending field. The state is copied, so
    continuing the collection never changes it.
    """
    if not isinstance(state, Mapping):
        raise CalibrationError(f"{name}: calibration state must be a dict, got {type(state).__name__}")
    version = _require(state, "version", int, name)
    if version != STATE_VERSION:
        raise CalibrationError(f"{name}: calibration state version {version}, expected {STATE_VERSION}")
    kind = _require(state, "kind", str, name)
    if isinstance(calibrator, calib.HistogramCalibrator):
        expected = KIND_HISTOGRAM
    elif isinstance(calibrator, calib.MaxCalibrator):
        expected = KIND_MAX
    else:
        raise CalibrationError(f"{name}: cannot import into a {type(calibrator).__name__}")
    if kind != expected:
        raise CalibrationError(f"{name}: state is of a {kind!r} calibrator, the quantizer has a {expected!r} one")
    _check_setting(state, "num_bits", int(calibrator._num_bits), int, name)
    _check_setting(state, "unsigned", bool(calibrator._unsigned), bool, name)
    batches_seen = _require(state, "batches_seen", int, name)
    target = torch.device(device) if device is not None else _state_device(calibrator)
    if isinstance(calibrator, calib.HistogramCalibrator):
        _import_histogram(calibrator, state, target, name)
    else:
        _import_max(calibrator, state, target, name)
    return batches_seen


def calibrated_quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """Every quantizer with a calibrator, once per object, under its first module path."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, TensorQuantizer) and getattr(module, "_calibrator", None) is not None
    }


def export_calibration_state(model: nn.Module, batches_seen: int = 0) -> dict[str, CalibratorState]:
    """Every calibrator's state, keyed by quantizer module path; ``torch.save`` it as is."""
    return {
        name: export_calibrator_state(quantizer._calibrator, batches_seen)
        for name, quantizer in calibrated_quantizers(model).items()
    }


def import_calibration_state(
    model: nn.Module,
    state: Mapping[str, Mapping[str, Any]],
    device: torch.device | str | None = None,
) -> int:
    """Restore every calibrator from ``state``; return the batches seen before the save.

    The quantizers in the model and the names in the state must be the same set, and every
    entry must be valid; on any :class:`CalibrationError` no calibrator is left changed.
    Tensors go to ``device``, by default the model's (its first parameter or buffer, else the
    CPU).
    """
    if not isinstance(state, Mapping):
        raise CalibrationError(f"calibration state must be a dict, got {type(state).__name__}")
    quantizers = calibrated_quantizers(model)
    unknown = sorted(set(state) - set(quantizers))
    missing = sorted(set(quantizers) - set(state))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"not in the model: {', '.join(unknown[:20])}")
        if missing:
            parts.append(f"missing from the state: {', '.join(missing[:20])}")
        raise CalibrationError("calibration state does not match the model's quantizers; " + "; ".join(parts))
    for name, entry in state.items():
        if not isinstance(entry, Mapping):
            raise CalibrationError(f"quantizer {name}: calibration state must be a dict, got {type(entry).__name__}")
    counts = sorted({_require(entry, "batches_seen", int, f"quantizer {name}") for name, entry in state.items()})
    if len(counts) > 1:
        raise CalibrationError(f"calibration state mixes batch counts {counts}; it was not saved in one piece")
    target = torch.device(device) if device is not None else compat.model_device(model)
    # Import replaces attributes rather than writing into them, so keeping the old references
    # is enough to undo a half-done import when a later entry turns out to be malformed.
    backup = {name: dict(vars(q._calibrator)) for name, q in quantizers.items()}
    try:
        for name, quantizer in quantizers.items():
            import_calibrator_state(quantizer._calibrator, state[name], target, name=f"quantizer {name}")
    except CalibrationError:
        for name, quantizer in quantizers.items():
            vars(quantizer._calibrator).update(backup[name])
        raise
    batches_seen = counts[0] if counts else 0
    log.info("restored calibration state of %d quantizers after %d batches", len(quantizers), batches_seen)
    return batches_seen
