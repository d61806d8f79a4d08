"""The sensitivity analysis scored by nuScenes NDS/mAP (``--sensitivity-metric nds|map``).

The trained bevfusion-tiny on the generated tree: the devkit scores the held-out val
keyframes for every measurement. The FP32 model's drop is exactly zero, a broken quantizer
costs points, and the stage writes its ranking under the metric's name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bevfusion_ptq import pipeline
from bevfusion_ptq.data.batch import move_batch
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.amax_stage import calibrated_model
from bevfusion_ptq.pipeline.heldout import heldout_set
from bevfusion_ptq.pipeline.sensitivity_stage import make_metric
from bevfusion_ptq.quant.compat import iter_quantizers
from tests.model_helpers import torch_threads

GROUPS = ["encoders.lidar.backbone.conv_input", "decoder.neck.deblocks.0"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Statistics of 2 generated batches for the trained tiny, in one state directory."""
    home = tmp_path_factory.mktemp("score-home")
    with pytest.MonkeyPatch.context() as mp, torch_threads(1):
        mp.setenv("BEVFUSION_PTQ_HOME", str(home))
        params = PTQParams(calib_batches=2, device="cpu", heldout_batches=2, sensitivity_metric="nds",
                           sensitivity_groups=GROUPS, output=str(home / "out"))
        data = pipeline.prepare_dataset(params)
        ref = pipeline.fuse_bn_stage(params, pipeline.insert_quantizers_stage(
            params, pipeline.load_model_stage(params, pipeline.prepare_checkpoint(params))))
        stats = pipeline.collect_statistics_stage(params, ref, data)
    return home, params, ref, stats, data


def test_fp32_scores_no_drop_and_a_broken_quantizer_costs_points(stages, monkeypatch):
    home, params, ref, stats, data = stages
    monkeypatch.setenv("BEVFUSION_PTQ_HOME", str(home))
    with torch_threads(1):
        model = calibrated_model(params, ref, stats, data).eval()
        held = heldout_set(params, data)
        metric = make_metric(params, data, held, [move_batch(b, torch.device("cpu")) for b in held.loader(pin_memory=False)])
        quantizers = [q for _, q in iter_quantizers(model)]
        with torch.no_grad():
            for q in quantizers:
                q._disabled = True
            metric.prepare(model)
            assert metric.name == "nuScenes NDS drop (points)"
            assert metric.reference > 0.05, "the trained tiny must detect something on the val keyframes"
            assert metric.drop(model) == 0.0
            # The lidar input quantized with an amax 1000x too small: every point clips.
            lidar_input = dict(iter_quantizers(model))["encoders.lidar.backbone.conv_input.0._input_quantizer"]
            lidar_input._disabled = False
            lidar_input._amax.mul_(1e-3)
            assert metric.drop(model) > 1.0


def test_sensitivity_stage_ranks_groups_by_nds(stages, monkeypatch):
    home, params, ref, stats, data = stages
    monkeypatch.setenv("BEVFUSION_PTQ_HOME", str(home))
    with torch_threads(1):
        sens = pipeline.sensitivity_stage(params.model_copy(update={"sensitivity_target": 0.5}), ref, stats, data)
    result = json.loads(Path(sens.path).read_text())
    assert result["metric"] == "nuScenes NDS drop (points)"
    assert [g["name"] for g in result["groups"]] and len(result["groups"]) == 2
    assert result["evaluations"] >= 1 + 2 * 2
    assert result["proposal"]["target"] == 0.5
    assert "NDS" in sens.markdown
