"""Workarounds for pytorch-quantization 2.1.3 on torch 2.x and on the CPU.

pytorch-quantization 2.1.3 is the last real release (2.2.x on PyPI are empty stubs). It was
written for CUDA-only torch 1.x and has three problems we hit; each is handled here and only
here, so that the rest of the package can use the library as documented:

1. ``HistogramCalibrator.compute_amax("mse")`` moves the histogram to CUDA unconditionally,
   so MSE calibration cannot run on a CPU-only machine. We compute histogram amax with our
   own device-agnostic implementation (:mod:`bevfusion_ptq.quant.amax`), which gives the same
   answer on whatever device the histogram lives.
2. ``TensorQuantizer._load_from_state_dict`` creates a missing ``_amax`` buffer with
   ``.cuda()``, so loading a calibrated state dict into a fresh model fails without a GPU
   (and lands on the wrong GPU with one). :func:`prepare_amax_buffers` creates the buffers on
   the model's device first, which makes the library take its ordinary copy path.
3. ``TensorQuantizer.load_calib_amax`` registers the amax tensor wherever the calibrator left
   it (numpy-derived amax is on the CPU), so after calibrating on a GPU the fake-quant clamp
   mixes devices until the model is moved again. :func:`load_calib_amax` places every amax on
   the quantizer's own device.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping

import torch
from pytorch_quantization import calib
from pytorch_quantization.nn import TensorQuantizer
from torch import nn

from bevfusion_ptq.quant import amax as amax_math

log = logging.getLogger(__name__)

def model_device(model: nn.Module) -> torch.device:
    """Where the model lives: its first parameter's device, else a buffer's, else the CPU."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    """Yield (path, quantizer) once per quantizer object, under its first path.

    Shared quantizers are reachable under several paths; ``named_modules`` already
    deduplicates by identity, which is exactly the "one object, one scale" view we want.
    """
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            yield name, module


def compute_calibrator_amax(
    quantizer: TensorQuantizer,
    method: str,
    *,
    percentile: float = 99.99,
    start_bin: int = 128,
    stride: int = 1,
) -> torch.Tensor | None:
    """Amax from a quantizer's calibrator, on any device (problem 1).

    Max calibrators ignore ``method``: weights are always max-calibrated per channel, as the
    reference does. Histogram calibrators use the requested method, except ``max``, which
    takes the largest collected bin edge (the running max of the absolute values).
    """
    calibrator = quantizer._calibrator
    if isinstance(calibrator, calib.MaxCalibrator):
        return calibrator.compute_amax()
    if isinstance(calibrator, calib.HistogramCalibrator):
        hist, edges = calibrator._calib_hist, calibrator._calib_bin_edges
        if hist is None:
            return None
        if not isinstance(hist, torch.Tensor):  # numpy path (torch_hist=False)
            hist, edges = torch.from_numpy(hist), torch.from_numpy(edges)
        if method == "max":
            return edges[-1].float().clone()
        return amax_math.compute_amax(
            hist,
            edges,
            method,
            num_bits=quantizer.num_bits,
            unsigned=quantizer.unsigned,
            start_bin=start_bin,
            stride=stride,
            percentile=percentile,
        )
    raise TypeError(f"unsupported calibrator {type(calibrator).__name__}")


def set_amax(quantizer: TensorQuantizer, value: torch.Tensor, device: torch.device) -> None:
    """Store ``value`` as the quantizer's amax buffer on ``device`` (problem 3)."""
    value = value.detach().to(device=device, dtype=torch.float32)
    if hasattr(quantizer, "_amax"):
        if quantizer._amax.shape != value.shape:
            raise ValueError(
                f"amax shape changes from {tuple(quantizer._amax.shape)} to {tuple(value.shape)}"
            )
        quantizer._amax = value.clone()
    else:
        quantizer.register_buffer("_amax", value.clone())


def load_calib_amax(
    quantizer: TensorQuantizer,
    method: str,
    device: torch.device,
    **kwargs: float,
) -> torch.Tensor | None:
    """Replacement for ``TensorQuantizer.load_calib_amax`` that works on CPU and GPU.

    Returns the amax, or None when the calibrator never saw a tensor; the caller decides
    whether that is an error (it is, for every enabled quantizer).
    """
    value = compute_calibrator_amax(quantizer, method, **kwargs)
    if value is None:
        return None
    set_amax(quantizer, value, device)
    return quantizer._amax


def prepare_amax_buffers(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> int:
    """Create every ``_amax`` buffer the state dict carries, on the model's device (problem 2).

    After this, ``model.load_state_dict(state_dict)`` copies amax values like any other
    buffer instead of taking pytorch-quantization's ``.cuda()`` workaround. Returns the number
    of buffers created.
    """
    device = model_device(model)
    created = 0
    for name, module in model.named_modules():
        key = f"{name}._amax" if name else "_amax"
        if isinstance(module, TensorQuantizer) and key in state_dict and not hasattr(module, "_amax"):
            module.register_buffer("_amax", torch.empty_like(state_dict[key], device=device))
            created += 1
    return created
