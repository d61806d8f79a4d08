"""Where calibration's time per batch goes over the FP32 forward, variant by variant, in alternation.

Why a second script next to ``calibration.py``: that benchmark runs its phases minutes apart,
and on a shared GPU host the same collect has varied by 20 % between rounds, as much as the
overhead being measured. Here every variant runs once per round, rounds alternate, and each
variant's figure is the median over all its steady batches (every batch after the first of
a collect). Each batch ends at a sync (ours syncs there anyway, to check the batch; the
floor gets one added), so a batch's time is the host clock between two syncs.

Variants:

* ``floor``: the FP32 model, batches already on the device;
* ``floor_staged``: the FP32 model fed the way ours is fed, from pinned memory through the
  side-stream stager;
* ``ours``: :func:`bevfusion_ptq.quant.calibrate.collect`;
* ``ours_no_count``: ours with the counting launch replaced by nothing (host path kept);
* ``ours_no_snapshot``: ours without the per-batch device copy of the histograms (a redo
  would be wrong; none happens on these batches, which the script checks);
* ``ours_gc_frozen``: ours after ``gc.freeze()``, so a full collection skips the heap the
  imports and the model left;
* ``ours_side_stream``: ours with every counting launch on a second stream.

Also measured: garbage-collector pauses per variant and the host cost of one quantizer call.
Run on a GPU: ``python3 bench/collect_overhead.py --out DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibration import (  # noqa: E402 - the bench folder is not a package
    config_builder, features, fresh_calibrators, pin, sync, without_counting_kernel,
)


class GcPauses:
    """Milliseconds the garbage collector ran, per generation, while active."""

    def __init__(self) -> None:
        self.ms = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._start = 0.0
        self.active = False

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if not self.active:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            gen = info["generation"]
            self.ms[gen] += 1000 * (time.perf_counter() - self._start)
            self.count[gen] += 1

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        self.ms, self.count, self.active = [0.0, 0.0, 0.0], [0, 0, 0], True
        try:
            yield
        finally:
            self.active = False


@contextlib.contextmanager
def without_snapshot() -> Iterator[None]:
    from bevfusion_ptq.quant import histogram as hist

    begin = hist.CollectSession.begin_batch
    hist.CollectSession.begin_batch = lambda self: None
    try:
        yield
    finally:
        hist.CollectSession.begin_batch = begin


@contextlib.contextmanager
def counting_on_side_stream(device: torch.device) -> Iterator[None]:
    """Each counting launch on a second stream, after the main stream's work so far; the
    per-batch check waits for it. The model's own syncs then no longer wait for counting."""
    from bevfusion_ptq.quant import histogram as hist

    side = torch.cuda.Stream(device)
    launch, end_batch = hist._launch_count, hist.CollectSession.end_batch

    def on_side(flat: torch.Tensor, state: torch.Tensor, grid: torch.Tensor, capacity: int) -> None:
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            launch(flat, state, grid, capacity)
        flat.record_stream(side)

    def joined(self: Any, batch: int) -> list[int]:
        torch.cuda.current_stream(device).wait_stream(side)
        return end_batch(self, batch)

    hist._launch_count, hist.CollectSession.end_batch = on_side, joined
    try:
        yield
    finally:
        hist._launch_count, hist.CollectSession.end_batch = launch, end_batch


@contextlib.contextmanager
def gc_frozen() -> Iterator[None]:
    gc.freeze()  # no gc.collect() first: it would count as this variant's pause
    try:
        yield
    finally:
        gc.unfreeze()


#: Seconds of our collect outside its batches, per call of :func:`ours_batches`: from the call
#: to the session's entry done (``set_up``), the session's exit (``exit``), and from the last
#: batch's check to the collect's return, exit included (``tail``).
OUTSIDE: dict[str, list[float]] = {"set_up": [], "exit": [], "tail": []}


def ours_batches(model: torch.nn.Module, batches: list, device: torch.device) -> list[float]:
    """Seconds of each batch of our collect (host clock between the per-batch checks); the
    first batch counts from the session's entry, the time before it goes to ``OUTSIDE``."""
    from bevfusion_ptq.quant import histogram as hist
    from bevfusion_ptq.quant.calibrate import collect

    fresh_calibrators(model)
    stamps: list[float] = []
    enter, leave = hist.CollectSession.__enter__, hist.CollectSession.__exit__
    entered: list[float] = []
    exit_s: list[float] = []

    def timed_enter(self: Any) -> Any:
        out = enter(self)
        entered.append(time.perf_counter())
        return out

    def timed_exit(self: Any, *exc: Any) -> None:
        t0 = time.perf_counter()
        try:
            leave(self, *exc)
        finally:
            exit_s.append(time.perf_counter() - t0)

    hist.CollectSession.__enter__, hist.CollectSession.__exit__ = timed_enter, timed_exit
    try:
        sync(device)
        began = time.perf_counter()
        collect(model, batches, len(batches), progress=lambda seen, total: stamps.append(time.perf_counter()))
        sync(device)
        ended = time.perf_counter()
    finally:
        hist.CollectSession.__enter__, hist.CollectSession.__exit__ = enter, leave
    OUTSIDE["set_up"].append(entered[0] - began)
    OUTSIDE["exit"].append(exit_s[0])
    OUTSIDE["tail"].append(ended - stamps[-1])
    return [b - a for a, b in zip([entered[0]] + stamps, stamps)]


def floor_batches(run: Callable[[Any], Any], batches: list, device: torch.device, staged: bool) -> list[float]:
    from bevfusion_ptq.quant.calibrate import _Stager

    stage = _Stager(device)
    stamps = []
    sync(device)
    stamps.append(time.perf_counter())
    with torch.no_grad():
        following = stage(batches[0]) if staged else None
        for i, b in enumerate(batches):
            if staged:
                current = following.ready(device)
                following = stage(batches[i + 1]) if i + 1 < len(batches) else None
                run(current)
            else:
                run(b)
            sync(device)
            stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def host_cost_per_call(model: torch.nn.Module, device: torch.device, calls: int = 2000) -> dict[str, float]:
    """Host microseconds per call, with no sync inside the loop: a quantizer collecting a
    1024-value tensor (so that the GPU keeps up and the host's time is what is measured), the
    same without the counting launch, the quantizer disabled, and ``torch.relu`` for scale."""
    from bevfusion_ptq.quant.compat import iter_quantizers
    from bevfusion_ptq.quant.histogram import CollectSession

    name, q = next((n, q) for n, q in iter_quantizers(model) if type(q._calibrator).__name__ == "HistogramCalibrator")
    x = torch.rand(1 << 10, device=device)
    out: dict[str, float] = {}

    def per_call(fn: Callable[[], Any]) -> float:
        for _ in range(50):
            fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = time.perf_counter() - t0
        sync(device)
        return round(1e6 * host / calls, 2)

    out["torch_relu_us"] = per_call(lambda: torch.relu(x))
    q.disable_quant()
    q.enable_calib()
    with torch.no_grad(), CollectSession([(name, q)], device) as session:
        session.begin_batch()
        out["quantizer_collect_us"] = per_call(lambda: q(x))
        with without_counting_kernel():
            out["quantizer_collect_no_launch_us"] = per_call(lambda: q(x))
        session.end_batch(0)
    q.disable_calib()
    q.disable()
    out["quantizer_disabled_us"] = per_call(lambda: q(x))
    q.enable()
    q.enable_quant()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--points", type=int, default=250_000)
    ap.add_argument("--small", action="store_true", help="bevfusion-tiny on the CPU with few points (a smoke test)")
    ap.add_argument("--out", type=Path, default=Path("bench-collect-overhead"))
    a = ap.parse_args(argv)
    if a.small:
        a.batches, a.rounds, a.points = min(a.batches, 3), min(a.rounds, 2), 4000
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)
    device = torch.device("cpu" if a.small else "cuda")
    a.out.mkdir(parents=True, exist_ok=True)

    from bevfusion_ptq.data.batch import move_batch, random_batch
    from bevfusion_ptq.model.checkpoint import make_checkpoint
    from bevfusion_ptq.model.config import load_config
    from bevfusion_ptq.quant.calibrate import calibration_backends

    cfg_name = "bevfusion-tiny" if a.small else "bevfusion-r50"
    cfg = load_config(cfg_name)
    prepare = pin if device.type == "cuda" else (lambda b: b)
    batches = [prepare(random_batch(cfg, num_points=a.points, seed=i)) for i in range(a.batches)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "r50.pth"
        make_checkpoint(ckpt, cfg, seed=0)
        build = config_builder(cfg, ckpt)
        floor_model, ours_model = build(False).to(device), build(True).to(device)
    run_floor = features(floor_model)
    resident = [move_batch(b, device) for b in batches]
    pauses = GcPauses()
    gc.callbacks.append(pauses)

    def floor() -> list[float]:
        with calibration_backends(device):
            return floor_batches(run_floor, resident, device, staged=False)

    def floor_staged() -> list[float]:
        with calibration_backends(device):
            return floor_batches(run_floor, batches, device, staged=True)

    def ours() -> list[float]:
        return ours_batches(ours_model, batches, device)

    def ours_no_count() -> list[float]:
        with without_counting_kernel():
            return ours()

    def ours_no_snapshot() -> list[float]:
        with without_snapshot():
            return ours()

    def ours_gc_frozen() -> list[float]:
        with gc_frozen():
            return ours()

    def ours_side_stream() -> list[float]:
        with counting_on_side_stream(device):
            return ours()

    chosen = (floor, floor_staged, ours, ours_no_count, ours_no_snapshot, ours_gc_frozen)
    if device.type == "cuda":
        chosen += (ours_side_stream,)
    variants = {f.__name__: f for f in chosen}
    for fn in variants.values():
        fn()  # warm: cuDNN's choices, the kernel's compile, the allocator's pools
    steady: dict[str, list[float]] = {k: [] for k in variants}
    first: dict[str, list[float]] = {k: [] for k in variants}
    totals: dict[str, list[float]] = {k: [] for k in variants}
    gc_ms: dict[str, list[float]] = {k: [] for k in variants}
    gc_full: dict[str, int] = {k: 0 for k in variants}
    outside: list[dict[str, float]] = []
    for r in range(a.rounds):
        for name, fn in variants.items():
            with pauses.watching():
                times = fn()
            steady[name] += times[1:]
            first[name].append(times[0])
            totals[name].append(sum(times))
            gc_ms[name].append(sum(pauses.ms))
            gc_full[name] += pauses.count[2]
            if name == "ours":
                outside.append({k: v[-1] for k, v in OUTSIDE.items()})
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(
            f"{k} {1000 * statistics.median(v[-(a.batches - 1):]):.1f}" for k, v in steady.items()), flush=True)
    floor_ms = 1000 * statistics.median(steady["floor"])
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "setup": {"model": cfg_name, "batches": a.batches, "rounds": a.rounds, "points": a.points},
        "variants": {},
        "host_cost_per_call": host_cost_per_call(ours_model, device),
    }
    for name in variants:
        ms = 1000 * statistics.median(steady[name])
        result["variants"][name] = {
            "steady_batch_ms_median": round(ms, 2),
            "steady_batch_ms_mean": round(1000 * statistics.fmean(steady[name]), 2),
            "steady_batch_ms_p10_p90": [round(1000 * q, 2) for q in statistics.quantiles(steady[name], n=10)[::8]],
            "first_batch_ms_median": round(1000 * statistics.median(first[name]), 2),
            "collect_ms_per_batch_median": round(1000 * statistics.median(totals[name]) / a.batches, 2),
            "gc_ms_per_round_median": round(statistics.median(gc_ms[name]), 2),
            "gc_full_collections": gc_full[name],
            "over_floor": round(ms / floor_ms, 4),
        }
    # Our collect outside its batches, over the plain ``ours`` variant's timed rounds.
    result["ours_outside_batches_ms"] = {k: round(1000 * statistics.median(row[k] for row in outside), 2)
                                         for k in OUTSIDE}
    (a.out / "collect_overhead.json").write_text(json.dumps(result, indent=2))
    print(f"{'variant':<18} {'steady ms':>10} {'mean':>8} {'first':>8} {'collect/b':>10} {'gc ms':>7} {'÷ floor':>8}")
    for name, v in result["variants"].items():
        print(f"{name:<18} {v['steady_batch_ms_median']:>10.2f} {v['steady_batch_ms_mean']:>8.2f} "
              f"{v['first_batch_ms_median']:>8.2f} {v['collect_ms_per_batch_median']:>10.2f} "
              f"{v['gc_ms_per_round_median']:>7.2f} {v['over_floor']:>8.3f}")
    print("host µs per call:", json.dumps(result["host_cost_per_call"]))
    print("ours outside its batches, ms per collect:", json.dumps(result["ours_outside_batches_ms"]))
    return result


if __name__ == "__main__":
    main()
