"""Quantizer placement of the BEVFusion rule set: the reference's places and shared scales."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from pytorch_quantization.nn import TensorQuantizer
from torch import nn

from bevfusion_ptq.data.batch import random_batch
from bevfusion_ptq.errors import QuantizationRuleError
from bevfusion_ptq.model.builder import build_model
from bevfusion_ptq.model.config import load_config
from bevfusion_ptq.quant.blocks import QuantBottleneck, QuantConcat, QuantSparseBasicBlock
from bevfusion_ptq.quant.calibrate import calibrate
from bevfusion_ptq.quant.compat import iter_quantizers
from bevfusion_ptq.quant.fuse import fuse_bn
from bevfusion_ptq.quant.insert import apply_exclusions, insert_quantizers, share_quantizers
from bevfusion_ptq.quant.rules import BEVFUSION_SHARE, DEFAULT_EXCLUDE, ShareGroup, bevfusion_rules
from tests.quant_helpers import SmallFusionNet

BRANCHES = (
    "encoders.camera.backbone",
    "encoders.camera.neck",
    "encoders.camera.vtransform",
    "encoders.lidar.backbone",
    "fuser",
    "decoder",
)

# Distinct quantizer objects per branch (each counted under its first path). Backbone: an
# input and a weight quantizer per conv, minus one per downsample[0] (shares conv1's), plus
# one identity quantizer per block with a downsample. Neck: the two concats and the two
# lateral inputs belong to the backbone's layer3/layer4 groups. Lidar: two per sparse conv,
# one add per SparseBasicBlock. vtransform: dtransform + depthnet only.
EXPECTED_COUNTS = {
    "bevfusion-r50": {
        "encoders.camera.backbone": 106,
        "encoders.camera.neck": 6,
        "encoders.camera.vtransform": 12,
        "encoders.lidar.backbone": 50,
        "fuser": 2,
        "decoder": 28,
    },
    "bevfusion-tiny": {
        "encoders.camera.backbone": 34,
        "encoders.camera.neck": 6,
        "encoders.camera.vtransform": 12,
        "encoders.lidar.backbone": 50,
        "fuser": 2,
        "decoder": 16,
    },
}


def _branch(path: str) -> str:
    return next((b for b in BRANCHES if path.startswith(b + ".")), path.split(".")[0])


def _random_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics so that folding them is really tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def _quantized(name: str) -> tuple[nn.Module, object]:
    cfg = load_config(name)
    model = build_model(cfg).eval()
    insert_quantizers(model, bevfusion_rules())
    return model, cfg


@pytest.fixture(scope="module")
def r50() -> nn.Module:
    return _quantized("bevfusion-r50")[0]


@pytest.mark.parametrize("name", ["bevfusion-r50", "bevfusion-tiny"])
def test_distinct_quantizers_per_branch(name, r50):
    model = r50 if name == "bevfusion-r50" else _quantized(name)[0]
    counts = Counter(_branch(path) for path, _ in iter_quantizers(model))
    print(f"\n{name}: {dict(counts)} total {sum(counts.values())}")
    assert dict(counts) == EXPECTED_COUNTS[name]


def test_head_and_vtransform_downsample_stay_float(r50):
    for prefix in ("heads", "encoders.camera.vtransform.downsample"):
        sub = r50.get_submodule(prefix)
        assert not any(isinstance(m, TensorQuantizer) for m in sub.modules()), prefix
        assert not any(hasattr(m, "_input_quantizer") for m in sub.modules()), prefix


def test_block_classes_are_swapped_in(r50):
    backbone = r50.encoders.camera.backbone
    assert all(type(b) is QuantBottleneck for layer in (backbone.layer1, backbone.layer4) for b in layer)
    assert all(type(c) is QuantConcat for c in r50.encoders.camera.neck.concats)
    sparse = [m for m in r50.encoders.lidar.backbone.modules() if isinstance(m, QuantSparseBasicBlock)]
    assert len(sparse) == 8


def test_share_groups_are_one_object(r50):
    for group in BEVFUSION_SHARE:
        quantizers = [r50.get_submodule(p)._input_quantizer for p in group.members]
        assert all(q is quantizers[0] for q in quantizers), group.name
    # the two groups are distinct scales
    a, b = (r50.get_submodule(g.members[0])._input_quantizer for g in BEVFUSION_SHARE)
    assert a is not b


def test_bottleneck_residual_sharing(r50):
    blocks = [m for m in r50.modules() if isinstance(m, QuantBottleneck)]
    assert len(blocks) == 16
    with_downsample = [b for b in blocks if b.downsample is not None]
    assert len(with_downsample) == 4
    for block in blocks:
        major = block.conv1._input_quantizer
        if block.downsample is None:
            assert block.residual_quantizer is major
        else:
            assert block.downsample[0]._input_quantizer is major
            assert block.residual_quantizer is not major
            assert isinstance(block.residual_quantizer, TensorQuantizer)
            assert block.residual_quantizer._calibrator.__class__.__name__ == "HistogramCalibrator"


def test_share_group_with_missing_path_names_group_and_path(r50):
    model = copy.deepcopy(r50)
    group = ShareGroup("made-up", ("encoders.camera.backbone.layer3.0.conv1", "encoders.camera.neck.concats.7"))
    with pytest.raises(QuantizationRuleError, match=r"made-up.*concats\.7"):
        share_quantizers(model, group)


def test_bevfusion_rules_on_another_model_name_the_unmatched_rules():
    with pytest.raises(QuantizationRuleError, match="bottleneck-residual"):
        insert_quantizers(SmallFusionNet(), bevfusion_rules())


def test_fuse_bn_with_quantized_blocks_preserves_outputs():
    cfg = load_config("bevfusion-tiny")
    model = build_model(cfg).eval()
    _random_bn(model)
    batch = random_batch(cfg, num_points=4000, seed=1)
    with torch.no_grad():
        before = model.extract_features(batch)
    insert_quantizers(model, bevfusion_rules())
    for _, q in iter_quantizers(model):
        q.disable()
    folded = fuse_bn(model)
    assert folded > 0
    assert not any(
        isinstance(m, nn.BatchNorm2d) for n, m in model.named_modules() if n.startswith("encoders.camera.backbone")
    )
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.encoders.lidar.backbone.modules())
    with torch.no_grad():
        after = model.extract_features(batch)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-3, atol=1e-4, msg=key)


def test_tiny_calibrates_end_to_end_and_exclusions():
    model, cfg = _quantized("bevfusion-tiny")
    fuse_bn(model)
    batches = [random_batch(cfg, num_points=4000, seed=i) for i in range(2)]
    result = calibrate(model, batches, method="mse", num_batches=2)
    quantizers = dict(iter_quantizers(model))
    assert set(result.amax) == set(quantizers)
    for name, amax in result.amax.items():
        assert torch.isfinite(amax).all() and (amax > 0).all(), name
    disabled = apply_exclusions(model, DEFAULT_EXCLUDE)
    assert sorted(disabled) == [
        "decoder.neck.deblocks.0.0._input_quantizer",
        "decoder.neck.deblocks.0.0._weight_quantizer",
        "encoders.lidar.backbone.conv_input.0._input_quantizer",
        "encoders.lidar.backbone.conv_input.0._weight_quantizer",
    ]
    for name, q in quantizers.items():
        assert q._disabled == (name in disabled), name
    with torch.no_grad():
        out = model.extract_features(batches[0])
    assert all(torch.isfinite(v).all() for v in out.values())
