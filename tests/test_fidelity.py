"""Fidelity report: INT8 fake-quant against FP32 on bevfusion-tiny calibrated on generated data."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_quantization.nn import TensorQuantizer
from torch import nn

from bevfusion_ptq.data import build_calibration_set, make_dataset
from bevfusion_ptq.errors import CalibrationError
from bevfusion_ptq.model import load_config, load_model, make_checkpoint
from bevfusion_ptq.quant.calibrate import calibrate
from bevfusion_ptq.quant.compat import iter_quantizers
from bevfusion_ptq.quant.fidelity import (
    STAGES,
    FidelityError,
    bevfusion_forward,
    compare_tensors,
    fidelity_report,
    match_boxes,
)
from bevfusion_ptq.quant.fuse import fuse_bn
from bevfusion_ptq.quant.insert import apply_exclusions, insert_quantizers
from bevfusion_ptq.quant.rules import DEFAULT_EXCLUDE, bevfusion_rules, default_rules
from tests.model_helpers import torch_threads
from tests.quant_helpers import SmallFusionNet

_CALIBRATED: dict[str, tuple[nn.Module, list[dict]]] = {}


def calibrated_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, list[dict]]:
    """bevfusion-tiny with random weights (real checkpoint path), quantized, BN-fused,
    calibrated with percentile on 2 generated keyframes, default exclusions applied; plus
    the 3 generated batches. Built once per session (also used by test_plots); tests that
    change it work on a deep copy or put it back.
    """
    if "tiny" not in _CALIBRATED:
        with torch_threads(1):
            root: Path = tmp_path_factory.mktemp("fidelity")
            cfg = load_config("bevfusion-tiny")
            make_checkpoint(root / "tiny.pth", cfg, seed=3)
            model = load_model(cfg, root / "tiny.pth").eval()
            make_dataset(root / "data", scenes=2, frames=3, seed=0)
            calib_set = build_calibration_set(root / "data", None, cfg.data, 3)
            batches = list(calib_set.loader(num_workers=0, pin_memory=False))
            insert_quantizers(model, bevfusion_rules())
            fuse_bn(model)
            calibrate(model, batches, method="percentile", num_batches=2)
            apply_exclusions(model, DEFAULT_EXCLUDE)
        _CALIBRATED["tiny"] = (model, batches)
    return _CALIBRATED["tiny"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[nn.Module, list[dict]]:
    return calibrated_tiny(tmp_path_factory)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def quantizer_state(model: nn.Module) -> list[tuple[Any, ...]]:
    """Every quantizer's flags, amax and histogram, for exact before/after comparison."""
    state = []
    for name, q in iter_quantizers(model):
        amax = getattr(q, "_amax", None)
        hist = getattr(q._calibrator, "_calib_hist", None) if q._calibrator is not None else None
        state.append(
            (
                name,
                q._disabled,
                q._if_quant,
                q._if_calib,
                q._if_clip,
                None if amax is None else amax.clone(),
                None if hist is None else torch.as_tensor(hist).clone(),
            )
        )
    return state


def assert_same_state(before: list[tuple[Any, ...]], after: list[tuple[Any, ...]]) -> None:
    assert len(before) == len(after)
    for b, a in zip(before, after, strict=True):
        assert b[:5] == a[:5], b[0]
        for x, y in zip(b[5:], a[5:], strict=True):
            assert (x is None and y is None) or torch.equal(x, y), b[0]


# ------------------------------------------------------------------ metric units
def test_compare_tensors_definitions():
    f = torch.tensor([3.0, -4.0, 0.0])
    assert compare_tensors(f.clone(), f) == (1.0, 0.0)
    cos, rel = compare_tensors(2 * f, f)
    assert cos == pytest.approx(1.0) and rel == pytest.approx(1.0)
    cos, rel = compare_tensors(-f, f)
    assert cos == pytest.approx(-1.0) and rel == pytest.approx(2.0)
    cos, rel = compare_tensors(torch.tensor([4.0, 3.0, 0.0]), f)
    assert cos == pytest.approx(0.0) and rel == pytest.approx(math.sqrt(2.0))
    assert compare_tensors(torch.zeros(3), torch.zeros(3)) == (1.0, 0.0)
    assert compare_tensors(torch.ones(3), torch.zeros(3)) == (0.0, math.inf)
    with pytest.raises(FidelityError, match="shape"):
        compare_tensors(torch.zeros(2), torch.zeros(3))


def _boxes(xy: list[tuple[float, float]], labels: list[int], scores: list[float]) -> dict[str, torch.Tensor]:
    centre = torch.tensor([[x, y, 0.0] for x, y in xy]).reshape(-1, 3)
    return {"center": centre, "label": torch.tensor(labels, dtype=torch.long), "score": torch.tensor(scores)}


def test_match_boxes_greedy_one_to_one_by_class_and_distance():
    fp32 = _boxes([(0, 0), (0.1, 0), (10, 10), (20, 20), (30, 30)], [1, 1, 2, 3, 4], [0.9, 0.8, 0.7, 0.6, 0.5])
    int8 = _boxes([(0.05, 0), (10.3, 10.3), (20.2, 20), (30.5, 30)], [1, 2, 0, 4], [0.9, 0.8, 0.7, 0.6])
    # box 0 takes the only class-1 INT8 box, so box 1 (also near it) stays unmatched;
    # box 2 is 0.42 m away (matched); box 3 has the wrong class; box 4 is exactly 0.5 m (not < 0.5).
    assert match_boxes(fp32, int8) == (2, 5)
    assert match_boxes(fp32, int8, match_distance=0.51) == (3, 5)
    # top_k applies to both passes: the FP32 top-1 against INT8's top-1
    assert match_boxes(fp32, int8, top_k=1) == (1, 1)
    assert match_boxes(fp32, _boxes([], [], [])) == (0, 5)
    assert match_boxes(_boxes([], [], []), int8) == (0, 0)


# ------------------------------------------------------------------ on bevfusion-tiny
def test_all_quantizers_disabled_is_exactly_fp32(tiny, caplog):
    model, batches = tiny
    fp32 = copy.deepcopy(model)
    for _, q in iter_quantizers(fp32):
        q.disable()
    caplog.set_level(logging.INFO, logger="bevfusion_ptq.quant.fidelity")
    report = fidelity_report(fp32, batches, num_batches=2)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fidelity batch")]
    assert [m.split(":")[0] for m in progress] == ["fidelity batch 1/2", "fidelity batch 2/2"]
    assert "heatmap cos=1.000000 relL2=0" in progress[0] and "boxes" in progress[0]
    assert [s.name for s in report.stages] == list(STAGES)
    for stage in report.stages:
        assert stage.cosine == (1.0, 1.0), stage.name
        assert stage.rel_l2 == (0.0, 0.0), stage.name
    assert report.boxes is not None and report.boxes.fp32_boxes > 0
    assert report.boxes.agreement == 1.0 and report.boxes.worst == 1.0
    assert report.enabled_quantizers == 0 and report.quantizers > 0


def test_calibrated_int8_report_numbers_and_formats(tiny):
    model, batches = tiny
    before = quantizer_state(model)
    model.train()  # the report switches to eval and must put the mode back
    try:
        report = fidelity_report(model, batches, num_batches=2, top_k=100, match_distance=0.5)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    assert_same_state(before, quantizer_state(model))

    assert report.num_batches == 2 and report.enabled_quantizers == report.quantizers - 4
    for stage in report.stages:
        assert len(stage.cosine) == 2
        for cos, rel in zip(stage.cosine, stage.rel_l2, strict=True):
            assert 0.0 < cos <= 1.0, stage.name
            assert 0.0 <= rel < 1.0, stage.name
        assert stage.cosine_worst == min(stage.cosine) and stage.rel_l2_worst == max(stage.rel_l2)
    # quantization really happened, and it is not noise
    assert any(s.rel_l2_mean > 0 for s in report.stages)
    assert report.stage("decoder_out").cosine_mean > 0.9
    boxes = report.boxes
    assert boxes is not None and 0 < boxes.fp32_boxes <= 100 * 2
    assert 0.0 <= boxes.agreement <= 1.0 and boxes.worst <= boxes.agreement

    data = json.loads(json.dumps(report.as_dict(), allow_nan=False))
    assert [s["name"] for s in data["stages"]] == list(STAGES)
    assert data["boxes"]["matched"] == boxes.matched
    summary = report.summary()
    json.dumps(summary, allow_nan=False)
    assert summary["batches"] == 2 and summary["min_cosine_stage"] in STAGES
    assert summary["min_cosine"] == pytest.approx(min(s.cosine_worst for s in report.stages), abs=1e-6)
    assert summary["box_agreement"] == pytest.approx(boxes.agreement, abs=1e-6)
    md = report.markdown()
    assert "| camera BEV |" in md and "| head heatmap (logits) |" in md and "top-100" in md


def test_quantizer_state_restored_after_error_mid_report(tiny):
    model, batches = tiny
    before = quantizer_state(model)
    calls = []

    def failing_forward(m, batch):
        calls.append(1)
        if len(calls) == 3:  # batch 2's FP32 pass: every quantizer is switched off right now
            assert all(q._disabled for _, q in iter_quantizers(m))
            raise RuntimeError("worker lost")
        return bevfusion_forward(m, batch)

    with pytest.raises(RuntimeError, match="worker lost"):
        fidelity_report(model, batches, num_batches=2, forward=failing_forward)
    assert len(calls) == 3
    assert_same_state(before, quantizer_state(model))


def test_too_few_batches_fails_clearly(tiny):
    model, batches = tiny
    before = quantizer_state(model)
    with pytest.raises(FidelityError, match="asked for 4 fidelity batches, the data has 3"):
        fidelity_report(model, batches, num_batches=4)
    # a generator has no length: it fails once exhausted, and still restores everything
    with pytest.raises(FidelityError, match="asked for 2 fidelity batches, the data gave 1") as err:
        fidelity_report(model, (b for b in batches[:1]), num_batches=2)
    assert isinstance(err.value, CalibrationError) and err.value.exit_code == CalibrationError.exit_code
    assert_same_state(before, quantizer_state(model))


def test_model_without_quantizers_or_amax_fails_clearly():
    with pytest.raises(FidelityError, match="no quantizers"):
        fidelity_report(nn.Sequential(nn.Conv2d(3, 3, 1)), [{}], num_batches=1)
    net = SmallFusionNet().eval()
    insert_quantizers(net, default_rules(()))  # quantizers, never calibrated
    with pytest.raises(FidelityError, match=r"have no amax.*camera\.0\._input_quantizer"):
        fidelity_report(net, [{}], num_batches=1)
    assert all(isinstance(q, TensorQuantizer) and not q._disabled for _, q in iter_quantizers(net))
