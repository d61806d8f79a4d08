"""--calib-method auto: every histogram quantizer gets the candidate with the least measured
error on held-out batches; everything else about the model is left as it was."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pytorch_quantization import calib

from bevfusion_ptq.quant.auto_amax import CHOICE_ATTR, PERCENTILES, candidate_amax, choose_amax
from bevfusion_ptq.quant.compat import iter_quantizers
from bevfusion_ptq.quant.report import quantizer_status
from tests.model_helpers import torch_threads
from tests.test_fidelity import calibrated_tiny

# choose_amax computes six candidates for ~60 histograms and re-runs every quantized layer
# six times: minutes on a 2-core CPU.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def auto_tiny(tmp_path_factory):
    """A copy of the calibrated tiny model, auto-chosen on the one batch calibration never saw."""
    model, batches = calibrated_tiny(tmp_path_factory)
    model = copy.deepcopy(model)
    flags = {n: (q._disabled, q._if_quant, q._if_calib) for n, q in iter_quantizers(model)}
    weights = {n: q._amax.clone() for n, q in iter_quantizers(model) if isinstance(q._calibrator, calib.MaxCalibrator)}
    with torch_threads(1):
        choices = choose_amax(model, batches[2:], 1)
    return model, choices, flags, weights


def test_every_histogram_quantizer_gets_its_least_error_candidate(auto_tiny):
    model, choices, _, _ = auto_tiny
    histogram = {n: q for n, q in iter_quantizers(model) if isinstance(q._calibrator, calib.HistogramCalibrator)}
    assert set(choices) == set(histogram) and len(choices) > 20
    names = {"mse", "entropy", "max", *(f"percentile-{p:g}" for p in PERCENTILES)}
    criteria = set()
    for name, c in choices.items():
        assert set(c.errors) == set(c.candidates) == names, name
        assert all(math.isfinite(e) and e >= 0 for e in c.errors.values()), name
        assert c.errors[c.winner] == min(c.errors.values()), name
        assert 0 <= c.margin <= 1 and 0 <= c.vs_mse <= 1, name
        # the quantizer now holds the winner's amax
        q = histogram[name]
        assert float(q._amax) == pytest.approx(c.amax) == c.candidates[c.winner]
        assert getattr(q, CHOICE_ATTR)["winner"] == c.winner
        criteria.add(c.criterion)
    # convolutions are judged at their output, residual adds and concats on their own tensor
    assert criteria == {"consumer", "own"}
    # candidates differ (the max is never below the 99.9th percentile) and the winners are not all one method
    assert all(c.candidates["max"] >= c.candidates["percentile-99.9"] for c in choices.values())
    assert len({c.winner for c in choices.values()}) > 1
    # the candidates are what the histogram gives (checked on a few: entropy is slow on a CPU)
    for name in list(choices)[:3]:
        fresh = candidate_amax(histogram[name])
        assert {m: float(v) for m, v in fresh.items()} == pytest.approx(choices[name].candidates), name


def test_flags_and_weight_amax_are_put_back(auto_tiny):
    model, _, flags, weights = auto_tiny
    assert {n: (q._disabled, q._if_quant, q._if_calib) for n, q in iter_quantizers(model)} == flags
    for name, q in iter_quantizers(model):
        if name in weights:
            assert torch.equal(q._amax, weights[name]), name


def test_status_rows_record_the_winner_and_its_margin(auto_tiny):
    model, choices, _, _ = auto_tiny
    rows = {r.name: r for r in quantizer_status(model, "auto")}
    for name, c in choices.items():
        assert rows[name].method == f"auto:{c.winner}"
        assert rows[name].auto["margin"] == c.margin and rows[name].auto["errors"] == c.errors
    assert all(r.auto is None for r in rows.values() if r.calibrator == "max")
