"""bench/collect_overhead.py end to end on bevfusion-tiny (CPU, ``--small``).

The script runs for real on a GPU; here it runs on the tiny model so that its variants, the
breakdown outside the batches and the JSON are checked in CI. No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "collect_overhead.py"


@pytest.mark.slow
def test_every_variant_is_measured_and_saved(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("bench_collect_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        result = module.main(["--small", "--out", str(tmp_path)])
    finally:
        sys.modules.pop(spec.name, None)
    assert json.loads((tmp_path / "collect_overhead.json").read_text()) == result
    # CPU: no side-stream variant; every other variant timed its steady batches.
    assert set(result["variants"]) == {"floor", "floor_staged", "ours", "ours_no_count", "ours_no_snapshot",
                                       "ours_gc_frozen"}
    assert result["variants"]["floor"]["over_floor"] == 1.0
    assert all(v["steady_batch_ms_median"] > 0 and v["first_batch_ms_median"] > 0
               for v in result["variants"].values())
    assert set(result["ours_outside_batches_ms"]) == {"set_up", "exit", "tail"}
    outside = result["ours_outside_batches_ms"]
    assert 0 < outside["exit"] <= outside["tail"]  # the tail runs the session's exit
    assert all(v > 0 for v in result["host_cost_per_call"].values())
