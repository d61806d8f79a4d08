"""collect-statistics then compute-amax as plain library calls: the statistics file is the
calibration-state format, a method change runs no forward pass, and the amax equals a
one-shot calibration's."""

from __future__ import annotations

import pytest
import torch

from bevfusion_ptq import pipeline
from bevfusion_ptq.errors import CalibrationError
from bevfusion_ptq.model.bevfusion import BEVFusion
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.collect_stage import load_statistics
from bevfusion_ptq.quant.calib_state import STATE_VERSION, import_calibration_state
from bevfusion_ptq.quant.calibrate import calibrate
from bevfusion_ptq.quant.insert import apply_exclusions
from bevfusion_ptq.workdir import load_model
from tests.model_helpers import torch_threads


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Fused tiny model and its statistics on 2 generated batches, in one state directory."""
    home = tmp_path_factory.mktemp("amax-stage")
    mp = pytest.MonkeyPatch()
    mp.setenv("BEVFUSION_PTQ_HOME", str(home))
    params = PTQParams(calib_batches=2, device="cpu", fidelity_batches=0, output=str(home / "out"))
    with torch_threads(1):
        ckpt, data = pipeline.prepare_checkpoint(params), pipeline.prepare_dataset(params)
        ref = pipeline.fuse_bn_stage(params, pipeline.insert_quantizers_stage(params, pipeline.load_model_stage(params, ckpt)))
        stats = pipeline.collect_statistics_stage(params, ref, data)
    yield params, ref, data, stats
    mp.undo()


@pytest.fixture
def counted(monkeypatch):
    calls = []
    original = BEVFusion.extract_features
    monkeypatch.setattr(BEVFusion, "extract_features", lambda self, batch: calls.append(1) or original(self, batch))
    return calls


def test_statistics_file_is_the_calibration_state_format(stages):
    params, ref, _, stats = stages
    state = load_statistics(stats)
    assert {entry["version"] for entry in state.values()} == {STATE_VERSION}
    assert {entry["batches_seen"] for entry in state.values()} == {2}
    assert {entry["kind"] for entry in state.values()} == {"histogram", "max"}
    assert import_calibration_state(load_model(ref), state) == 2
    assert stats.made_from["collected"] == 2 and stats.made_from["resumed_from"] == 0


@pytest.mark.parametrize("method", ["mse", "entropy"])
def test_amax_equals_a_one_shot_calibration_and_runs_no_forward(stages, counted, method, monkeypatch):
    params, ref, data, stats = stages
    params = params.model_copy(update={"calib_method": method})
    with torch_threads(1):
        out = pipeline.compute_amax_stage(params, ref, stats, data)
        assert counted == []  # compute-amax never ran the model
        staged = {k: v for k, v in load_model(out).state_dict().items() if k.endswith("._amax")}
        one_shot = load_model(ref)
        calib = pipeline.inputs.open_calibration_set(params, data)
        calibrate(one_shot, calib.loader(num_workers=0, pin_memory=False), method=method, num_batches=2)
        apply_exclusions(one_shot, tuple(params.exclude))
    expected = {k: v for k, v in one_shot.state_dict().items() if k.endswith("._amax")}
    assert staged.keys() == expected.keys() and len(staged) >= 120
    for name in staged:
        assert torch.equal(staged[name], expected[name]), name
    assert out.made_from["method"] == method and out.made_from["statistics"] == stats.key
    # the method is part of compute-amax's key, not of collect-statistics'
    other = params.model_copy(update={"calib_method": "max", "exclude": [], "percentile": 99.9})
    assert pipeline.collect_statistics_key(other, ref, data) == stats.key
    assert pipeline.compute_amax_key(other, ref, stats, data) != out.key


def test_statistics_of_another_batch_count_are_refused(stages):
    params, ref, data, stats = stages
    three = data.model_copy(update={"tokens": [*data.tokens, data.tokens[0]]})  # a set of 3 keyframes
    with pytest.raises(CalibrationError, match="hold 2 batches, the run asks for 3"):
        pipeline.compute_amax_stage(params, ref, stats, three)


def test_auto_exclusion_target_is_validated():
    with pytest.raises(ValueError, match="must be a number"):
        PTQParams(exclude=["auto:x"])
    with pytest.raises(ValueError, match="at most one"):
        PTQParams(exclude=["auto:0.1", "auto:0.2"])
    p = PTQParams(exclude=["decoder.neck", "auto:0.05"])
    assert p.auto_exclude_target == 0.05 and p.exclude_patterns == ["decoder.neck"] and p.runs_sensitivity
