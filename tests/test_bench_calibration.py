"""bench/calibration.py's measurement and report, on the small camera+lidar net (CPU).

The benchmark runs for real on a GPU (``bevfusion-r50``); here every phase runs on a model
that takes milliseconds, so that the harness itself (phases, reference loop, agreement,
ratios, table) is checked in CI. No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from bevfusion_ptq.quant.fuse import fuse_bn
from bevfusion_ptq.quant.insert import insert_quantizers
from bevfusion_ptq.quant.rules import default_rules
from tests.quant_helpers import SmallFusionNet, random_batch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "calibration.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_calibration", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def build(quantized: bool) -> torch.nn.Module:
    torch.manual_seed(0)  # conv weights come from the global generator: every phase the same net
    model = SmallFusionNet().eval()
    if quantized:
        insert_quantizers(model, default_rules(()))
    fuse_bn(model)
    return model


def run(bench, *extra: str) -> dict:
    args = bench.options(["--device", "cpu", "--repeats", "1", "--ref-repeats", "1", "--warmup", "0",
                          "--no-profile", *extra])
    batches = [random_batch(i) for i in range(3)]
    return bench.measure(build, batches, torch.device("cpu"), args, ("fuser.0",))


def test_measure_reports_every_phase_and_ratio(bench):
    r = run(bench)
    for phase in ("floor", "ours", "reference"):
        assert r[phase]["batch_median_s"] > 0
    assert r["ours"]["amax_median_s"] > 0 and r["reference"]["amax_s"] > 0
    assert set(r["ratios"]) >= {"P1", "P1_side_by_side", "P2", "P3", "P6", "P2_at_300_batches"}
    sbs = r["side_by_side"]
    assert len(sbs["ratios"]) == len(sbs["floor_batch_s"]) == len(sbs["ours_batch_s"]) == 1  # --repeats 1
    assert min(sbs["ratios"]) <= r["ratios"]["P1_side_by_side"] <= max(sbs["ratios"])
    # The small net has one of BEVFusion's regions (fuser); each variant timed it.
    assert {k: set(v) for k, v in sbs["regions_ms"].items()} == {
        "floor": {"fuser"}, "ours": {"fuser"}, "ours_without_counting_kernel": {"fuser"}}
    assert all(v["fuser"] > 0 for v in sbs["regions_ms"].values())
    assert r["ratios"]["P6"] is None  # no GPU memory figures on the CPU
    assert r["goals_met"]["P6"] is None and r["goals_met"]["P1"] in (True, False)
    # Same data, same calibration maths: every amax within one bin of the reference's.
    agreement = r["agreement"]
    assert agreement["histogram_quantizers"] == 5 and agreement["max_quantizers"] == 5
    assert agreement["histogram_beyond_one_bin"] == 0
    assert agreement["max_max_rel_diff"] == 0.0
    same = r["reference"]["same_histograms"]
    assert same["quantizers"] == 5 and same["max_diff_in_bin_widths"] == 0.0
    assert r["quantizers"] == {"distinct": 10, "histogram": 5, "max": 5, "disabled_after_default_exclusions": 2}
    # Fed the very same tensors, our calibrators and the library's agree within a bin.
    same_input = r["ours"]["same_input"]
    assert same_input["histogram_quantizers"] == 5 and same_input["amax_beyond_one_bin"] == 0
    assert same_input["max_quantizers_equal"] == same_input["max_quantizers"] == 5
    for text in ("floor (FP32 forward)", "ours collect + amax", "reference loop", "P1 =", "P6 =", "P1 side by side", "per region",
                 "10 distinct (5 histogram, 5 max), 2 disabled"):
        assert text in r["table"], text


def test_reference_amax_past_its_budget_is_estimated(bench):
    r = run(bench, "--ref-amax-budget", "0")
    detail = r["reference"]["amax_detail"]
    assert detail["estimated_quantizers"] == 4 and detail["measured_quantizers"] == 1  # the largest
    # The estimated ones take our maths on the reference's histograms: still one bin or less.
    assert r["agreement"]["histogram_beyond_one_bin"] == 0
    assert "estimated at the measured cost per candidate bin" in r["table"]
