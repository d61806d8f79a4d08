"""What Prefect costs and what caching saves, on bevfusion-tiny with generated data (CPU).

In one process, after every import:
1. ``library``: the pipeline stages called directly (fresh state directory);
2. ``flow cold``: the Prefect flow on a fresh state directory (ephemeral local API, as the CLI);
3. ``flow warm``: the same flow again, every stage cached.

Then as a user runs it, process start included (``bevfusion-ptq run`` in a subprocess, on a
fresh state directory, no PREFECT_API_URL):
4. ``cli cold``: the first run;
5. ``cli warm, full flow``: the same run with ``--full-flow`` (the flow, every stage cached);
6. ``cli warm``: the same run again (the re-run fast path: the version is already published).

Prints the wall times, the Prefect overhead (flow cold vs library) and each warm re-run as a
share of its cold run, and writes them as JSON. ``--cli-only`` skips 1-3.

    .venv/bin/python bench/flow_overhead.py [--calib-batches 4] [--out bench/results/flow_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _library(params) -> None:
    from bevfusion_ptq import pipeline
    from bevfusion_ptq.s3 import publish_version

    ckpt, data, ref = pipeline.calibrated_in_process(params)
    fidelity = pipeline.fidelity_stage(params, ref, data)
    saved = pipeline.save_artifacts_stage(params, ref, ckpt, data, fidelity)
    publish_version(saved.path, params.output)


def _in_process(root: Path, calib_batches: int) -> dict[str, float]:
    os.environ["PREFECT_HOME"] = str(root / "prefect-home")
    os.environ.pop("PREFECT_API_URL", None)
    from bevfusion_ptq.params import PTQParams
    from flows.ptq import ptq

    def params(name: str) -> PTQParams:
        return PTQParams(calib_batches=calib_batches, fidelity_batches=1, device="cpu", output=str(root / name / "out"))

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
    return figures


def _cli(root: Path, calib_batches: int, *extra: str) -> float:
    # As a user without a Prefect set-up runs it; a slow machine may lengthen the temporary
    # server's start-up allowance (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") or k == "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    env.update(BEVFUSION_PTQ_HOME=str(root / "cli" / "state"), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "flows.cli", "-q", "run", "--calib-batches", str(calib_batches),
           "--fidelity-batches", "1", "--device", "cpu", "--output", str(root / "cli" / "out"), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    print(f"{seconds:6.2f} s  {proc.stdout.strip().splitlines()[-1]}", file=sys.stderr)
    return round(seconds, 2)


def _processes(root: Path, calib_batches: int, repeats: int) -> dict[str, float]:
    figures = {"cli_cold_s": _cli(root, calib_batches)}
    figures["cli_warm_full_flow_s"] = round(statistics.median(
        _cli(root, calib_batches, "--full-flow") for _ in range(repeats)), 2)
    figures["cli_warm_s"] = round(statistics.median(_cli(root, calib_batches) for _ in range(repeats)), 2)
    figures["cli_warm_full_flow_share_of_cold_pct"] = round(
        100 * figures["cli_warm_full_flow_s"] / figures["cli_cold_s"], 1)
    figures["cli_warm_share_of_cold_pct"] = round(100 * figures["cli_warm_s"] / figures["cli_cold_s"], 1)
    figures["repeats_median_of"] = repeats
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="warm CLI runs; the median is reported")
    parser.add_argument("--cli-only", action="store_true", help="only the CLI runs (4-6)")
    parser.add_argument("--out", default="bench/results/flow_overhead.json")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="flow-overhead-"))
    figures: dict[str, float] = {}
    figures.update(_processes(root, args.calib_batches, args.repeats))
    if not args.cli_only:
        figures.update(_in_process(root, args.calib_batches))
    figures["calib_batches"] = args.calib_batches
    print(json.dumps(figures, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
