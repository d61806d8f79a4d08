"""The gate as a pure function, and its parameters on the command line."""

from __future__ import annotations

import pytest

from bevfusion_ptq.evaluation.gate import GateThresholds, gate_verdict
from bevfusion_ptq.params import PTQParams

FP32 = {"mean_ap": 0.6789, "nd_score": 0.7098}
INT8 = {"mean_ap": 0.6766, "nd_score": 0.7081}  # NVIDIA's ResNet50 PTQ: -0.23 / -0.17 points


def test_the_reference_drops_pass_the_default_gate():
    verdict = gate_verdict(FP32, INT8, {"min_cosine": 0.99}, GateThresholds())
    assert verdict.status == "passed" and not verdict.failed
    checks = {c.name: c for c in verdict.checks}
    assert checks["mAP drop"].measured == pytest.approx(0.23) and checks["mAP drop"].passed
    assert checks["NDS drop"].measured == pytest.approx(0.17) and checks["NDS drop"].passed
    assert checks["fidelity cosine"].passed is None  # no threshold by default


def test_a_failed_check_says_which_and_by_how_much():
    verdict = gate_verdict(FP32, INT8, {"min_cosine": 0.97}, GateThresholds(0.1, 0.5, 0.98))
    assert verdict.status == "failed"
    failed = [c for c in verdict.checks if c.passed is False]
    assert [c.name for c in failed] == ["mAP drop", "fidelity cosine"]
    assert failed[0].excess == pytest.approx(0.13) and failed[1].excess == pytest.approx(0.01)
    assert "mAP drop 0.23" in verdict.reason and "by 0.13" in verdict.reason and "NDS" not in verdict.reason
    assert "\n" not in verdict.reason
    assert verdict.as_dict()["checks"][0]["excess"] == pytest.approx(0.13)


def test_equal_to_the_limit_passes_and_improvements_pass():
    assert gate_verdict(FP32, {"mean_ap": 0.6739, "nd_score": 0.7148}, None, GateThresholds(0.5, 0.0)).status == "passed"


def test_none_skips_and_missing_measurements_are_not_checked():
    skipped = gate_verdict(FP32, INT8, {"min_cosine": 0.5}, GateThresholds(None, None, None))
    assert skipped.status == "skipped" and "every threshold is none" in skipped.reason
    no_eval = gate_verdict(None, None, {}, GateThresholds(0.5, 0.5, 0.9))
    assert no_eval.status == "skipped" and all(c.passed is None for c in no_eval.checks)
    assert "evaluation switched off" in no_eval.checks[0].note
    fidelity_only = gate_verdict(None, None, {"min_cosine": 0.95}, GateThresholds(0.5, 0.5, 0.9))
    assert fidelity_only.status == "passed"


def test_cli_takes_none_for_the_thresholds():
    from flows.cli import build_parser, params_from_args

    ns = build_parser().parse_args(["run", "--max-map-drop", "none", "--max-nds-drop", "0.25",
                                    "--min-fidelity-cosine", "0.99", "--eval-samples", "40"])  # fmt: skip
    params = params_from_args(ns)
    assert (params.max_map_drop, params.max_nds_drop, params.min_fidelity_cosine) == (None, 0.25, 0.99)
    assert params.eval_samples == 40 and PTQParams().max_map_drop == 0.5 and PTQParams().eval_samples is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--max-map-drop", "lots"])
