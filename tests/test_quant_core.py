"""Quantizer insertion, BN fusion and calibration on a small camera+lidar net (CPU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pytorch_quantization import nn as quant_nn
from torch import nn

from bevfusion_ptq.errors import CalibrationError, QuantizationRuleError
from bevfusion_ptq.quant.calibrate import calibrate
from bevfusion_ptq.quant.compat import iter_quantizers
from bevfusion_ptq.quant.fuse import fuse_bn
from bevfusion_ptq.quant.insert import apply_exclusions, insert_quantizers
from bevfusion_ptq.quant.modules import QuantSparseConv3d, QuantSubMConv3d
from bevfusion_ptq.quant.report import quantizer_status
from bevfusion_ptq.quant.rules import Rule, RuleSet, default_rules
from tests.quant_helpers import SmallFusionNet, random_batch


def _forward(model, batch):
    return model(batch)


def test_insert_swaps_every_conv_and_keeps_weights():
    model = SmallFusionNet().eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    plan = insert_quantizers(model, default_rules(()))
    assert [m.path for m in plan.modules] == ["camera.0", "camera.3", "lidar.0", "lidar.3", "fuser.0"]
    assert isinstance(model.camera[0], quant_nn.QuantConv2d)
    assert isinstance(model.lidar[0], QuantSubMConv3d)
    assert isinstance(model.lidar[3], QuantSparseConv3d)
    # Same weights under the same names; only quantizer state was added.
    state = model.state_dict()
    for key, value in weights.items():
        assert torch.equal(state[key], value), key
    assert len(list(iter_quantizers(model))) == 10


def test_unmatched_rule_names_the_rule():
    rules = RuleSet("needs-linear", (Rule("linear-layers", (nn.Linear,), lambda m, i, w: m),))
    with pytest.raises(QuantizationRuleError, match="linear-layers"):
        insert_quantizers(SmallFusionNet(), rules)


def test_fuse_bn_preserves_outputs_dense_and_sparse():
    model = SmallFusionNet().eval()
    batch = random_batch(1)
    with torch.no_grad():
        before = model(batch)
    fused = copy.deepcopy(model)
    assert fuse_bn(fused) == 5
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    with torch.no_grad():
        after = fused(batch)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_fuse_bn_into_quantized_convs_with_quantizers_off():
    model = SmallFusionNet().eval()
    insert_quantizers(model, default_rules(()))
    for _, q in iter_quantizers(model):
        q.disable()
    batch = random_batch(2)
    with torch.no_grad():
        before = model(batch)
        fuse_bn(model)
        after = model(batch)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_conv_transpose_bn_is_not_folded():
    seq = nn.Sequential(nn.ConvTranspose2d(4, 4, 2, stride=2, bias=False), nn.BatchNorm2d(4))
    assert fuse_bn(seq) == 0
    assert isinstance(seq[1], nn.BatchNorm2d)


@pytest.mark.parametrize("method", ["mse", "percentile", "entropy", "max"])
def test_calibrate_gives_finite_positive_amax_for_every_quantizer(method):
    model = SmallFusionNet().eval()
    insert_quantizers(model, default_rules(()))
    fuse_bn(model)
    batches = [random_batch(i) for i in range(4)]
    result = calibrate(model, batches, method=method, num_batches=3, forward=_forward)
    assert result.num_batches == 3
    assert len(result.amax) == 10
    for name, amax in result.amax.items():
        assert torch.isfinite(amax).all() and (amax > 0).all(), name
    # Quantization is now on: outputs differ from float, but stay close.
    rows = quantizer_status(model, method)
    assert all(r.enabled and r.amax is not None for r in rows)
    with torch.no_grad():
        quantized = model(batches[0])
        for _, q in iter_quantizers(model):
            q.disable()
        reference = model(batches[0])
    assert not torch.equal(quantized, reference)
    cos = nn.functional.cosine_similarity(quantized.flatten(), reference.flatten(), dim=0)
    assert cos > 0.98


def test_calibrate_collects_exactly_the_requested_batches():
    model = SmallFusionNet().eval()
    insert_quantizers(model, default_rules(()))
    calls = []

    def forward(m, batch):
        calls.append(1)
        return m(batch)

    calibrate(model, (random_batch(i) for i in range(10)), method="max", num_batches=4, forward=forward)
    assert len(calls) == 4  # the reference's loop would have run 5


def test_too_few_batches_is_an_error():
    model = SmallFusionNet().eval()
    insert_quantizers(model, default_rules(()))
    with pytest.raises(CalibrationError, match="asked for 5 .* gave 2"):
        calibrate(model, [random_batch(0), random_batch(1)], num_batches=5, forward=_forward)


def test_quantizer_that_saw_no_data_fails_by_name():
    model = SmallFusionNet().eval()
    insert_quantizers(model, default_rules(()))

    def camera_only(m, batch):
        return m.camera(batch["img"])

    with pytest.raises(CalibrationError, match="lidar.0._input_quantizer"):
        calibrate(model, [random_batch(0)], num_batches=1, forward=camera_only)


def test_quantized_sparse_forward_leaves_weights_unchanged():
    model = SmallFusionNet().eval()
    insert_quantizers(model, default_rules(()))
    calibrate(model, [random_batch(0)], method="max", num_batches=1, forward=_forward)
    before = model.lidar[0].weight.detach().clone()
    with torch.no_grad():
        for i in range(3):
            model(random_batch(i))
    assert torch.equal(model.lidar[0].weight, before)
    # and the quantizer really quantizes that weight when it is used
    quantized = model.lidar[0]._weight_quantizer(model.lidar[0].weight)
    assert not torch.equal(quantized, before)


def test_exclusions_disable_by_module_path():
    model = SmallFusionNet().eval()
    insert_quantizers(model, default_rules(()))
    disabled = apply_exclusions(model, ("lidar.0", "fuser.*"))
    assert sorted(disabled) == [
        "fuser.0._input_quantizer", "fuser.0._weight_quantizer",
        "lidar.0._input_quantizer", "lidar.0._weight_quantizer",
    ]
    enabled = {n for n, q in iter_quantizers(model) if not q._disabled}
    assert "camera.0._input_quantizer" in enabled and len(enabled) == 6


def test_weight_quantizers_are_per_output_channel_max():
    model = SmallFusionNet().eval()
    insert_quantizers(model, default_rules(()))
    calibrate(model, [random_batch(0)], method="mse", num_batches=1, forward=_forward)
    sparse = model.lidar[0]
    amax = sparse._weight_quantizer._amax
    assert amax.numel() == 8  # Cout of the spconv 2 [Cout, k, k, k, Cin] weight
    expected = sparse.weight.detach().abs().amax(dim=(1, 2, 3, 4))
    torch.testing.assert_close(amax.flatten(), expected)
    assert not math.isnan(float(amax.sum()))
