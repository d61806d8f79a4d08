"""Each dependency of the stack doing its real job on the CPU (not just importing)."""

from __future__ import annotations

import subprocess
import sys

import spconv.pytorch as spconv
from spconv.core import ConvAlgo
import torch
from pytorch_quantization import nn as quant_nn
from pytorch_quantization.tensor_quant import QuantDescriptor

from bevfusion_ptq.quant import compat


def test_spconv_submconv3d_forward_on_cpu():
    torch.manual_seed(0)
    # Native: the algorithm a CPU tensor needs; a CUDA build of spconv defaults to implicit GEMM
    conv = spconv.SubMConv3d(5, 16, 3, padding=1, bias=False, indice_key="subm1", algo=ConvAlgo.Native)
    coords = torch.unique(torch.randint(0, 20, (300, 3)), dim=0)
    indices = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], dim=1).int()
    x = spconv.SparseConvTensor(torch.randn(len(indices), 5), indices, [20, 20, 20], 1)
    out = conv(x)
    assert out.features.shape == (len(indices), 16)
    assert torch.equal(out.indices, x.indices)  # submanifold: same active sites
    # The centre tap alone, for a site with no neighbours, is a plain matmul: check one site.
    dense = out.dense()
    assert dense.shape == (1, 16, 20, 20, 20)
    assert torch.isfinite(out.features).all()


def test_quantconv2d_calibrate_then_quantize_round_trip():
    torch.manual_seed(0)
    conv = quant_nn.QuantConv2d(
        3, 4, 3, padding=1,
        quant_desc_input=QuantDescriptor(num_bits=8, calib_method="histogram"),
        quant_desc_weight=QuantDescriptor(num_bits=8, axis=(0,)),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    for q in (conv._input_quantizer, conv._weight_quantizer):
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        float_out = conv(x)
    for q in (conv._input_quantizer, conv._weight_quantizer):
        compat.load_calib_amax(q, "mse", torch.device("cpu"))
        q.disable_calib()
        q.enable_quant()
    with torch.no_grad():
        int8_out = conv(x)
    assert conv._weight_quantizer._amax.numel() == 4
    assert not torch.equal(int8_out, float_out)
    rel = (int8_out - float_out).norm() / float_out.norm()
    assert rel < 0.05


def test_mmdet3d_registry_builds_sparse_encoder_on_spconv_and_second():
    import mmdet3d.models  # noqa: F401 - registers the models
    from mmdet3d.models.layers.spconv import IS_SPCONV2_AVAILABLE
    from mmdet3d.registry import MODELS

    assert IS_SPCONV2_AVAILABLE
    encoder = MODELS.build(
        dict(
            type="SparseEncoder", in_channels=5, sparse_shape=[41, 64, 64], order=("conv", "norm", "act"),
            norm_cfg=dict(type="BN1d", eps=1e-3, momentum=0.01),
            encoder_channels=((8,), (8, 16), (16, 32), (32, 32)),
            encoder_paddings=((1,), (1, 1), (1, 1), ((0, 1, 1), 1)),
            block_type="basicblock", output_channels=32,
        )
    ).eval()
    assert isinstance(encoder.conv_input[0], spconv.SubMConv3d)
    coords = torch.unique(torch.stack([torch.randint(0, 41, (500,)), torch.randint(0, 64, (500,)),
                                       torch.randint(0, 64, (500,))], 1), dim=0)
    coors = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1).int()
    from bevfusion_ptq.sparse_cpu import sparse_convs_on

    with torch.no_grad(), sparse_convs_on(encoder, torch.device("cpu")):  # Native on a CUDA spconv build
        bev = encoder(torch.randn(len(coors), 5), coors, 1)
    assert tuple(bev.shape) == (1, 64, 8, 8) and torch.isfinite(bev).all()  # 32 ch x 2 z-slices

    second = MODELS.build(
        dict(type="SECOND", in_channels=bev.shape[1], out_channels=[16, 32], layer_nums=[1, 1],
             layer_strides=[1, 2], norm_cfg=dict(type="BN", eps=1e-3, momentum=0.01),
             conv_cfg=dict(type="Conv2d", bias=False))
    ).eval()
    with torch.no_grad():
        outs = second(bev)
    assert [tuple(o.shape) for o in outs] == [(1, 16, 8, 8), (1, 32, 4, 4)]


def test_cli_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("run", "make-checkpoint", "inspect-checkpoint", "make-dataset"):
        assert command in out
    run_help = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in ("--output", "--calib-batches", "--device", "--calib-method", "--exclude"):
        assert option in run_help


def test_library_never_imports_prefect():
    code = (
        "import sys, bevfusion_ptq.pipeline, bevfusion_ptq.quant.calibrate;"
        "sys.exit(1 if any(m == 'prefect' or m.startswith('prefect.') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_sparse_conv_on_cpu_is_repeatable_under_our_guard():
    """spconv's CPU path races with several torch threads; our guard makes it exact."""
    from bevfusion_ptq.sparse_cpu import sparse_convs_on

    torch.manual_seed(0)
    conv = spconv.SparseConv3d(4, 8, 3, stride=(1, 1, 2), padding=1, bias=False).eval()
    coords = torch.unique(torch.randint(0, 16, (400, 3)), dim=0)
    indices = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], dim=1).int()
    features = torch.randn(len(indices), 4)
    threads = torch.get_num_threads()
    outs = []
    with torch.no_grad(), sparse_convs_on(conv, features.device):
        for _ in range(6):
            outs.append(conv(spconv.SparseConvTensor(features, indices, [16, 16, 16], 1)).features)
    assert torch.get_num_threads() == threads  # restored
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_sparse_convs_built_for_cuda_run_on_cpu(tmp_path):
    """A CUDA build of spconv gives every conv MaskImplicitGemm, which refuses CPU tensors
    ("implicit gemm only support cuda"). The model, fused and quantized, still runs on the CPU
    with that setting (Native is used there), gives the Native result, and keeps its own
    algorithm for CUDA afterwards."""
    from spconv.core import ConvAlgo
    from spconv.pytorch.conv import SparseConvolution

    from bevfusion_ptq.model.checkpoint import load_model, make_checkpoint
    from bevfusion_ptq.model.config import load_config
    from bevfusion_ptq.quant.fuse import fuse_bn
    from bevfusion_ptq.quant.insert import insert_quantizers
    from bevfusion_ptq.quant.rules import bevfusion_rules
    from tests.model_helpers import synthetic_batch

    cfg = load_config("bevfusion-tiny")
    make_checkpoint(tmp_path / "tiny.pth", cfg, seed=3)
    batch = synthetic_batch(cfg, num_points=4000, seed=3)
    for prepare in (lambda m: None, lambda m: (insert_quantizers(m, bevfusion_rules()), fuse_bn(m))):
        model = load_model(cfg, tmp_path / "tiny.pth")
        prepare(model)
        convs = [m for m in model.modules() if isinstance(m, SparseConvolution)]
        with torch.no_grad():
            native = model.extract_features(batch)["lidar_bev"]
            conv = convs[0]
            indices = torch.zeros(1, 4, dtype=torch.int32)
            with_cuda_algo = spconv.SparseConvTensor(torch.zeros(1, conv.in_channels), indices, [8, 8, 8], 1)
            for m in convs:
                m.algo = ConvAlgo.MaskImplicitGemm  # what a CUDA build picks by default
            try:
                conv._conv_forward(False, with_cuda_algo, conv.weight, None)  # the bare spconv call
            except AssertionError as exc:  # a CUDA torch says "implicit gemm only support cuda"
                assert "implicit gemm" in str(exc) or "CUDA" in str(exc)
            else:
                raise AssertionError("spconv accepted a CPU tensor with MaskImplicitGemm; the test is void")
            cuda_default = model.extract_features(batch)["lidar_bev"]
        assert torch.equal(cuda_default, native)
        assert all(m.algo == ConvAlgo.MaskImplicitGemm for m in convs)  # restored for CUDA
