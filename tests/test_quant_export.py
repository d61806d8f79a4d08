"""After calibration: ReLU recorded for export, NaN detection, the status table, and the way
back from ``state_dict.pth`` + ``quantizers.json`` (bevfusion-tiny, random weights, CPU)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from cumm.tensorview.gemm import Activation
from spconv.pytorch.conv import SparseConvolution

from bevfusion_ptq.artifacts import save_artifacts
from bevfusion_ptq.data.batch import random_batch
from bevfusion_ptq.errors import CalibrationError, CheckpointError
from bevfusion_ptq.model.builder import build_model
from bevfusion_ptq.model.config import load_config
from bevfusion_ptq.quant.calibrate import calibrate
from bevfusion_ptq.quant.fold_relu import activation_name, fold_relu
from bevfusion_ptq.quant.fuse import fuse_bn
from bevfusion_ptq.quant.insert import apply_exclusions, insert_quantizers
from bevfusion_ptq.quant.load import load_quantized
from bevfusion_ptq.quant.report import quantizer_status
from bevfusion_ptq.quant.rules import BEVFUSION_SHARE, DEFAULT_EXCLUDE, bevfusion_rules, default_rules
from tests.model_helpers import torch_threads
from tests.quant_helpers import SmallFusionNet, random_batch as small_batch
from tests.test_quant_placement import _random_bn


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Exact comparisons need one thread: bev_pool's multi-threaded CPU scatter sums in a
    varying order, so two forwards of the same model differ by ~1e-4 with two threads."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def calibrated(one_thread):
    """A calibrated, excluded, ReLU-folded bevfusion-tiny and two batches (built once)."""
    cfg = load_config("bevfusion-tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    _random_bn(model)
    insert_quantizers(model, bevfusion_rules())
    fuse_bn(model)
    batches = [random_batch(cfg, num_points=4000, seed=i) for i in range(2)]
    calibrate(model, batches, method="mse", num_batches=2)
    apply_exclusions(model, DEFAULT_EXCLUDE)
    with torch.no_grad():
        unfolded = model.extract_features(batches[0])
    folded = fold_relu(model)
    return cfg, model, batches, unfolded, folded


def test_fold_relu_records_act_and_keeps_forward(calibrated):
    _, model, batches, unfolded, folded = calibrated
    lidar = "encoders.lidar.backbone."
    assert folded and all(p.startswith(lidar) for p in folded)
    assert f"{lidar}conv_input.0" in folded
    assert f"{lidar}encoder_layers.encoder_layer1.0.conv1" in folded
    # conv2 feeds the residual add, not the ReLU directly.
    assert f"{lidar}encoder_layers.encoder_layer1.0.conv2" not in folded
    for path in folded:
        conv = model.get_submodule(path)
        assert conv.act_type == Activation.ReLU and activation_name(conv) == "ReLU"
    others = [
        p for p, m in model.named_modules() if isinstance(m, SparseConvolution) and p not in folded
    ]
    assert others and all(model.get_submodule(p).act_type == Activation.None_ for p in others)
    # Unlike the reference, the ReLU modules stay and the forward is unchanged.
    with torch.no_grad():
        after = model.extract_features(batches[0])
    for key, value in unfolded.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)


def test_status_table_names_share_groups_and_amax(calibrated):
    _, model, _, _, _ = calibrated
    rows = [r.as_dict() for r in quantizer_status(model, "mse", BEVFUSION_SHARE)]
    assert len(rows) == 120
    groups = {r["share_group"] for r in rows if r["share_group"]}
    assert {"layer3-lateral0", "layer4-lateral1"} <= groups
    assert any(g.startswith("residual:encoders.camera.backbone.layer") for g in groups)
    lateral = next(r for r in rows if r["share_group"] == "layer3-lateral0")
    assert "encoders.camera.neck.lateral_convs.0.conv._input_quantizer" in lateral["names"]
    disabled = sorted(r["name"] for r in rows if not r["enabled"])
    assert len(disabled) == 4
    for r in rows:
        if r["axis"] is None:
            assert isinstance(r["amax"], float) and r["method"] == "mse"
        else:
            assert r["amax_min"] <= r["amax_median"] <= r["amax_max"] and r["method"] == "max"
    json.dumps(rows)


def test_save_then_load_quantized_gives_identical_outputs(calibrated, tmp_path):
    cfg, model, batches, _, _ = calibrated
    status = [r.as_dict() for r in quantizer_status(model, "mse", BEVFUSION_SHARE)]
    saved = save_artifacts(model, status, tmp_path, model_name="bevfusion-tiny", version="v1", inputs={})
    rebuilt = load_quantized("bevfusion-tiny", saved.path / "state_dict.pth", saved.path / "quantizers.json")
    pickled = torch.load(saved.path / "model.pth", weights_only=False).module
    with torch.no_grad():
        expected = model.extract_features(batches[1])
        for other in (rebuilt, pickled):
            got = other.extract_features(batches[1])
            for key, value in expected.items():
                torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    disabled = {r["name"] for r in status if not r["enabled"]}
    for row in quantizer_status(rebuilt, "mse", BEVFUSION_SHARE):
        assert row.enabled == (row.name not in disabled)


def test_load_quantized_refuses_a_table_from_another_model(calibrated, tmp_path):
    _, model, _, _, _ = calibrated
    status = [r.as_dict() for r in quantizer_status(model, "mse", BEVFUSION_SHARE)]
    state = model.state_dict()
    with pytest.raises(CheckpointError, match="not in the file"):
        load_quantized("bevfusion-tiny", state, status[1:])
    wrong = copy.deepcopy(status)
    wrong[0]["num_bits"] = 4
    with pytest.raises(CheckpointError, match=wrong[0]["name"]):
        load_quantized("bevfusion-tiny", state, wrong)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_quantized("bevfusion-tiny", {k: v for k, v in state.items() if "fuser" not in k}, status)


def test_nan_activation_fails_naming_quantizer_and_batch():
    model = SmallFusionNet().eval()
    insert_quantizers(model, default_rules(()))
    fuse_bn(model)
    batches = [small_batch(0), small_batch(1), small_batch(2)]
    batches[1]["img"][0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"quantizer camera\.0\._input_quantizer in calibration batch 1"):
        calibrate(model, batches, method="mse", num_batches=3, forward=lambda m, b: m(b))
