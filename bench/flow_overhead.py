"""What Prefect costs and what caching saves, on bevfusion-tiny with generated data (CPU).

In one process, after every import:
1. ``library``: the pipeline stages called directly (fresh state directory);
2. ``flow cold``: the Prefect flow on a fresh state directory (ephemeral local API, as the CLI);
3. ``flow warm``: the same flow again, every stage cached.

Prints the three wall times, the Prefect overhead (flow cold vs library) and the warm re-run
as a share of the cold run, and writes them as JSON.

    .venv/bin/python bench/flow_overhead.py [--calib-batches 4] [--out bench/results/flow_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _library(params) -> None:
    from bevfusion_ptq import pipeline
    from bevfusion_ptq.s3 import publish_version

    ckpt = pipeline.prepare_checkpoint(params)
    data = pipeline.prepare_dataset(params)
    ref = pipeline.load_model_stage(params, ckpt)
    ref = pipeline.insert_quantizers_stage(params, ref)
    ref = pipeline.fuse_bn_stage(params, ref)
    ref = pipeline.calibrate_stage(params, ref, data)
    fidelity = pipeline.fidelity_stage(params, ref, data)
    saved = pipeline.save_artifacts_stage(params, ref, ckpt, data, fidelity)
    publish_version(saved.path, params.output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--out", default="bench/results/flow_overhead.json")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="flow-overhead-"))
    os.environ["PREFECT_HOME"] = str(root / "prefect-home")
    os.environ.pop("PREFECT_API_URL", None)
    from bevfusion_ptq.params import PTQParams
    from flows.ptq import ptq

    def params(name: str) -> PTQParams:
        return PTQParams(calib_batches=args.calib_batches, fidelity_batches=1, device="cpu", output=str(root / name / "out"))

    figures: dict[str, float] = {}
    for label, home, run in (
        ("flow_cold_s", "flow", lambda: ptq(params("flow"))),
        ("library_s", "library", lambda: _library(params("library"))),
        ("flow_warm_s", "flow", lambda: ptq(params("flow"))),
    ):
        os.environ["BEVFUSION_PTQ_HOME"] = str(root / home / "state")
        start = time.perf_counter()
        run()
        figures[label] = round(time.perf_counter() - start, 2)
    figures["prefect_overhead_pct"] = round(100 * (figures["flow_cold_s"] / figures["library_s"] - 1), 1)
    figures["warm_share_of_cold_pct"] = round(100 * figures["flow_warm_s"] / figures["flow_cold_s"], 1)
    figures["calib_batches"] = args.calib_batches
    print(json.dumps(figures, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
