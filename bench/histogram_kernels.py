"""Histogram counting kernels on the activations that calibration really sees (CUDA).

    python bench/histogram_kernels.py --out DIR

Captures the input of every histogram quantizer of ``bevfusion-r50`` (random
reference-layout weights, BN folded) in one forward of a full-shape random batch, then
times, on those same tensors, the counting step of one calibration batch:

* ``tl.histogram``: the first counting kernel (a 256-bin ``tl.histogram`` per program,
  values further out by one atomic each), kept here for the comparison;
* ``count_bins`` with several launch shapes: the library's CUDA kernel
  (``bevfusion_ptq/quant/count_bins.cu``, shared-memory histogram per block), and once with
  its first form's division of every value (``DIVIDE_EVERY_VALUE``);
* ``torch.histc``: what pytorch-quantization's ``torch_hist`` collect spends in ``histc``.

Every variant's counts are compared with ``torch.bincount`` of the same bins; a variant
that differs is reported and never picked. The fastest exact shape is written to
``DIR/histogram_kernels.json`` (``best``, by kernel time: the wall time also counts the host's
launches, which a calibration batch overlaps with the forward).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402  (the comparison kernel; Triton ships with CUDA builds of torch)
import triton.language as tl  # noqa: E402

from bevfusion_ptq.quant import histogram as hist  # noqa: E402

log = logging.getLogger("bench.histogram_kernels")

FIRST_BINS = hist.DEFAULT_BINS
CAPACITY = hist.NEAR_BINS


@triton.jit
def _tl_histogram_kernel(x_ptr, n, state_ptr, grid_ptr, capacity, BLOCK: tl.constexpr, LOW: tl.constexpr):
    """The earlier kernel: tl.histogram over the lowest LOW bins, an atomic per value past them."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    width = tl.load(state_ptr)
    t = tl.math.div_rn(tl.abs(x), width)
    bad = inside & ((t != t) | (t == float("inf")))
    good = inside & (t == t) & (t != float("inf"))
    tl.atomic_max(state_ptr + 2, tl.max(tl.where(good, t, 0.0), axis=0), sem="relaxed")
    tl.atomic_max(state_ptr + 3, tl.max(bad.to(tl.float32), axis=0), sem="relaxed")
    counted = good & (t < capacity)
    bins = tl.where(counted, t, 0.0).to(tl.int32)
    low = counted & (bins < LOW)
    counts = tl.histogram(bins, LOW, mask=low)
    tl.atomic_add(grid_ptr + tl.arange(0, LOW), counts.to(tl.float32), mask=counts > 0, sem="relaxed")
    tl.atomic_add(grid_ptr + bins, tl.full([BLOCK], 1.0, tl.float32), mask=counted & (bins >= LOW), sem="relaxed")


@triton.jit
def _finish_kernel(grid_ptr, state_ptr, capacity):
    """The earlier second launch: nb = max(nb, ceil(max)); fold the top edge into the bin below."""
    nb = tl.load(state_ptr + 1)
    top = tl.load(state_ptr + 2)
    bad = tl.load(state_ptr + 3)
    new_nb = tl.maximum(nb, tl.math.ceil(top))
    new_nb = tl.where((nb != nb) | (bad > 0.0), float("nan"), new_nb)
    tl.store(state_ptr + 1, new_nb)
    edge = tl.where(new_nb == new_nb, new_nb, -1.0).to(tl.int32)
    if (edge >= 1) & (edge < capacity):
        moved = tl.load(grid_ptr + edge)
        tl.store(grid_ptr + edge, 0.0)
        tl.store(grid_ptr + edge - 1, tl.load(grid_ptr + edge - 1) + moved)


def capture(device: torch.device, points: int) -> list[torch.Tensor]:
    """The inputs of every histogram quantizer in one forward up to the decoder."""
    from pytorch_quantization import calib

    from bevfusion_ptq.data.batch import random_batch
    from bevfusion_ptq.model.checkpoint import load_model, make_checkpoint
    from bevfusion_ptq.model.config import load_config
    from bevfusion_ptq.quant.compat import iter_quantizers
    from bevfusion_ptq.quant.fuse import fuse_bn
    from bevfusion_ptq.quant.insert import insert_quantizers
    from bevfusion_ptq.quant.rules import bevfusion_rules
    from bevfusion_ptq.quant.calibrate import default_forward

    cfg = load_config("bevfusion-r50")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "r50.pth"
        make_checkpoint(ckpt, cfg, seed=0)
        model = load_model(cfg, ckpt)
    insert_quantizers(model, bevfusion_rules())
    fuse_bn(model)
    model = model.eval().to(device)
    seen: list[torch.Tensor] = []
    handles = []
    for _, q in iter_quantizers(model):
        q.disable()  # plain pass-through: we only want the tensors
        if isinstance(q._calibrator, calib.HistogramCalibrator):
            handles.append(q.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone())))
    batch = random_batch(cfg, num_points=points, seed=0)
    with torch.no_grad():
        default_forward(model, batch)
    for h in handles:
        h.remove()
    del model
    torch.cuda.empty_cache()
    return [t.reshape(-1).float().contiguous() for t in seen]


def expected_counts(x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """bincount of floor(|x| / width), a value on the new top edge folded into the bin below.

    The top edge is max(nb, ceil(max)), as the library's finish kernel sets it; histc puts its
    upper edge in its last bin.
    """
    t = torch.div(x.abs(), state[0])
    grid = torch.bincount(t.floor().long(), minlength=CAPACITY + 1).float()
    edge = int(max(float(state[1]), float(t.max().ceil())))
    if 1 <= edge < grid.numel():
        grid[edge - 1] += grid[edge]
        grid[edge] = 0
    return grid[:CAPACITY]


def first_states(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A first-range state per tensor: width = max / 2048, nb = 2048."""
    out = []
    for x in tensors:
        top = x.abs().max()
        width = top / FIRST_BINS
        zero = torch.zeros_like(top)
        out.append(torch.stack([width, top / width, zero, zero, zero]))
    return out


def event_median_ms(fn: Any, repeats: int) -> float:
    """Median over ``repeats`` of ``fn``'s time between two CUDA events (host launches included)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_variant(launch: Any, tensors: list[torch.Tensor], states: list[torch.Tensor],
                repeats: int, finish: bool) -> tuple[float, float, list[torch.Tensor]]:
    """Wall time of one batch's counting (host launches included) and its kernel time."""
    grids = [torch.zeros(CAPACITY, device=x.device) for x in tensors]
    work = [s.clone() for s in states]

    def once() -> None:
        for x, s, g in zip(tensors, work, grids):
            launch(x, s, g)
            if finish:
                _finish_kernel[(1,)](g, s, CAPACITY)

    once()  # compile and warm
    for g in grids:
        g.zero_()
    for w, s in zip(work, states):
        w.copy_(s)
    once()
    torch.cuda.synchronize()
    result = [g.clone() for g in grids]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        once()
        torch.cuda.synchronize()
    kernel_ms = sum(e.device_time_total for e in prof.key_averages()
                    if "count" in e.key or "histogram" in e.key or "finish" in e.key) / 1000
    return event_median_ms(once, repeats), kernel_ms, result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=250_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench-histogram-kernels"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda")
    a.out.mkdir(parents=True, exist_ok=True)
    tensors = capture(device, a.points)
    states = first_states(tensors)
    expected = [expected_counts(x, s) for x, s in zip(tensors, states)]
    sizes = [x.numel() for x in tensors]
    log.info("%d histogram inputs, %.1f M values in all", len(tensors), sum(sizes) / 1e6)

    variants: dict[str, Any] = {
        "tl.histogram block 4096 low 256 warps 8": lambda x, s, g: _tl_histogram_kernel[(triton.cdiv(x.numel(), 4096),)](
            x, x.numel(), s, g, CAPACITY, BLOCK=4096, LOW=256, num_warps=8),
    }
    shapes = [  # local bins, copies, threads, blocks per SM, divide every value, loads per step
        (4096, 2, 1024, 1, True, 1), (4096, 2, 1024, 1, False, 1), (4096, 2, 1024, 1, False, 2),
        (4096, 2, 1024, 1, False, 4), (4096, 1, 1024, 1, False, 2), (2048, 4, 1024, 1, False, 2),
        (4096, 2, 1024, 2, False, 2), (4096, 2, 512, 2, False, 2), (4096, 2, 512, 4, False, 2),
        (2048, 2, 512, 4, False, 2), (4096, 2, 256, 8, False, 2),
    ]
    defaults = (hist.LOCAL_BINS, hist.LOCAL_COPIES, hist.COUNT_THREADS, hist.COUNT_BLOCKS_PER_SM,
                hist.DIVIDE_EVERY_VALUE, hist.LOADS_PER_STEP)

    def configure(local_bins: int, copies: int, threads: int, per_sm: int, divide: bool, loads: int) -> None:
        (hist.LOCAL_BINS, hist.LOCAL_COPIES, hist.COUNT_THREADS, hist.COUNT_BLOCKS_PER_SM,
         hist.DIVIDE_EVERY_VALUE, hist.LOADS_PER_STEP) = local_bins, copies, threads, per_sm, divide, loads

    for shape in shapes:
        def launch(x: torch.Tensor, s: torch.Tensor, g: torch.Tensor, shape: tuple = shape) -> None:
            configure(*shape)
            hist._launch_count(x, s, g, CAPACITY)
        configure(*shape)
        if not hist._kernels_work(device):
            log.warning("count_bins %s failed its self-check", shape)
        local_bins, copies, threads, per_sm, divide, loads = shape
        name = (f"count_bins local {local_bins}x{copies} threads {threads} blocks/SM {per_sm} loads {loads}"
                + (" dividing every value" if divide else ""))
        variants[name] = (launch, {"local_bins": local_bins, "local_copies": copies, "threads": threads,
                                   "blocks_per_sm": per_sm, "divide_every_value": divide, "loads_per_step": loads})
    configure(*defaults)

    rows: list[dict[str, Any]] = []
    for name, spec in variants.items():
        launch, shape = spec if isinstance(spec, tuple) else (spec, None)
        try:
            ms, kernel_ms, grids = run_variant(launch, tensors, states, a.repeats, finish=shape is None)
        except Exception as exc:  # noqa: BLE001 - a shape Triton refuses is a result too
            rows.append({"variant": name, "error": repr(exc)[:500]})
            log.warning("%s failed: %r", name, exc)
            continue
        # A bin past 2**24 counts rounds in float32 (pytorch-quantization's histograms are float32
        # too), and atomics add in any order: equal up to that rounding.
        wrong = [i for i, (g, e) in enumerate(zip(grids, expected)) if not torch.allclose(g, e, rtol=1e-6, atol=0)]
        rows.append({"variant": name, "ms_per_batch": ms, "kernel_ms_per_batch": kernel_ms,
                     "tensors_wrong": len(wrong), "shape": shape,
                     "wrong_detail": [{"values": sizes[i], "max": float(tensors[i].abs().max()),
                                       "bins_differing": int((grids[i] != expected[i]).sum()),
                                       "count_diff": float((grids[i] - expected[i]).abs().sum())}
                                      for i in wrong[:5]]})
        log.info("%-55s %8.2f ms per batch (kernels %.2f)  wrong %d %s", name, ms, kernel_ms, len(wrong),
                 rows[-1]["wrong_detail"][:2])

    # torch.histc over the same values, as pytorch-quantization's collect calls it.
    def histc_once() -> None:
        for x, s in zip(tensors, states):
            torch.histc(x.abs(), FIRST_BINS, 0, float(s[0] * FIRST_BINS))
    histc_once()
    torch.cuda.synchronize()
    rows.append({"variant": "torch.histc (abs + histc per tensor)", "ms_per_batch": event_median_ms(histc_once, a.repeats)})

    exact = [r for r in rows if r.get("shape") and r.get("tensors_wrong") == 0]
    best = min(exact, key=lambda r: r["kernel_ms_per_batch"]) if exact else None
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "tensors": len(tensors),
        "values_m": sum(sizes) / 1e6,
        "largest_m": max(sizes) / 1e6,
        "rows": rows,
        "best": best,
    }
    (a.out / "histogram_kernels.json").write_text(json.dumps(result, indent=2))
    for r in rows:
        print(f"{r['variant']:<58} {r.get('ms_per_batch', float('nan')):9.2f} ms  "
              f"kernels {r.get('kernel_ms_per_batch', float('nan')):7.2f} ms  "
              f"{'wrong ' + str(r['tensors_wrong']) if r.get('tensors_wrong') else r.get('error', '')}")
    print("best:", best)
    return result


if __name__ == "__main__":
    main()
