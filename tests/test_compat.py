"""The three pytorch-quantization 2.1.3 problems on torch 2.x / CPU, each handled by compat."""

from __future__ import annotations

import pytest
import torch
from pytorch_quantization import calib
from pytorch_quantization import nn as quant_nn
from pytorch_quantization.tensor_quant import QuantDescriptor
from torch import nn

from bevfusion_ptq.quant import compat


def _histogram_quantizer(data: torch.Tensor) -> quant_nn.TensorQuantizer:
    q = quant_nn.TensorQuantizer(QuantDescriptor(num_bits=8, calib_method="histogram"))
    q.disable_quant()
    q.enable_calib()
    q(data)
    q.disable_calib()
    q.enable_quant()
    return q


@pytest.mark.skipif(torch.cuda.is_available(), reason="the upstream failure only shows without CUDA")
def test_problem1_upstream_mse_needs_cuda_ours_does_not():
    q = _histogram_quantizer(torch.randn(4096))
    with pytest.raises((AssertionError, RuntimeError)):
        q._calibrator.compute_amax("mse")  # upstream moves the histogram to CUDA
    amax = compat.compute_calibrator_amax(q, "mse")
    assert amax is not None and 0 < float(amax) <= float(q._calibrator._calib_bin_edges[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the upstream failure only shows without CUDA")
def test_problem2_loading_amax_into_fresh_quantizer():
    q = _histogram_quantizer(torch.randn(4096))
    compat.load_calib_amax(q, "percentile", torch.device("cpu"))
    model = nn.Sequential(nn.Linear(2, 2), q)
    state = model.state_dict()

    fresh = nn.Sequential(nn.Linear(2, 2), quant_nn.TensorQuantizer(QuantDescriptor(num_bits=8)))
    with pytest.raises((AssertionError, RuntimeError)):
        fresh.load_state_dict(state)  # upstream registers the buffer with .cuda()

    fresh = nn.Sequential(nn.Linear(2, 2), quant_nn.TensorQuantizer(QuantDescriptor(num_bits=8)))
    assert compat.prepare_amax_buffers(fresh, state) == 1
    fresh.load_state_dict(state)
    assert fresh[1]._amax.device.type == "cpu"
    assert torch.equal(fresh[1]._amax, q._amax)


def test_problem3_amax_lands_on_the_quantizer_device_as_float32():
    class Float64Calibrator(calib.MaxCalibrator):
        """A calibrator handing back amax in another dtype, like numpy-derived values."""

        def compute_amax(self):
            return torch.tensor(3.0, dtype=torch.float64)

    q = quant_nn.TensorQuantizer(QuantDescriptor(num_bits=8))
    q._calibrator = Float64Calibrator(8, None, False)
    device = torch.device("cpu")
    amax = compat.load_calib_amax(q, "max", device)
    assert amax.dtype == torch.float32 and amax.device == device
    out = q(torch.tensor([1.0, 5.0]))
    assert torch.allclose(out, torch.tensor([1.0, 3.0]), atol=3 / 127)


@pytest.mark.gpu
def test_problem3_on_cuda_no_mixed_devices_after_loading_amax():
    q = _histogram_quantizer(torch.randn(4096, device="cuda"))
    amax = compat.load_calib_amax(q, "mse", torch.device("cuda"))
    assert amax.device.type == "cuda"
    out = q(torch.randn(16, device="cuda"))
    assert out.device.type == "cuda"
