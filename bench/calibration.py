"""Calibration speed: our collect + amax against the forward floor and the reference loop.

    python bench/calibration.py --out DIR                 # bevfusion-r50 on CUDA (issue 9)
    python bench/calibration.py --small --device cpu      # bevfusion-tiny, a CPU check

One process, one set of in-memory batches, three measurements, each after warm-up:

* ``floor``: the FP32 eval forward of the model without quantizers (BN folded, as
  calibration sees it) up to the decoder output, batches already on the device;
* ``ours``: :func:`bevfusion_ptq.quant.calibrate.collect` on the batches in pinned host
  memory (as a DataLoader with ``pin_memory`` hands them over), then
  :func:`~bevfusion_ptq.quant.calibrate.compute_amax` (MSE) for every quantizer;
* ``reference``: a re-creation of CUDA-BEVFusion's ``calibrate_model``: pytorch-quantization's
  own calibrators (``HistogramCalibrator`` with ``_torch_hist=True``, ``MaxCalibrator``), the
  full model forward with the head on every batch, then ``load_calib_amax(method="mse")`` per
  histogram quantizer and ``load_calib_amax()`` per max quantizer. The reference's loop runs one
  batch more than asked; here it runs exactly as many as ours, so that both see the same data.

Random reference-layout weights (``make_checkpoint``) and random batches of the real shapes
(``random_batch``: 6 x 3 x 256 x 704 images, ``--points`` lidar points uniform in the range).
Convolutions run in full FP32 (TF32 off) in all three. Floor and ours autotune cuDNN, the
reference keeps the default, as its script did. Times are medians over ``--repeats`` after
``--warmup`` passes. The reference amax runs once, because it takes about a second per quantizer.

Prints one table and the ratios, and writes them to ``DIR/calibration.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bevfusion_ptq.quant.calibrate import calibration_backends  # noqa: E402

log = logging.getLogger("bench.calibration")

GOALS = {"P1": ("<=", 1.10), "P2": (">=", 2.0), "P3": (">=", 20.0), "P6": ("<=", 1.10)}


# ----------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def pin(batch: dict[str, Any]) -> dict[str, Any]:
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.pin_memory()
        if isinstance(v, list) and v and all(isinstance(t, torch.Tensor) for t in v):
            return [t.pin_memory() for t in v]
        return v

    return {k: one(v) for k, v in batch.items()}


@contextlib.contextmanager
def cuda_is_identity() -> Iterator[None]:
    """pytorch-quantization's MSE search calls ``.cuda()`` unconditionally; on a CPU run
    (``--device cpu``) let it stay where it is, as tests/test_amax.py does."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def fresh_calibrators(model: torch.nn.Module) -> None:
    """Give every quantizer a new, empty pytorch-quantization calibrator of its kind."""
    from pytorch_quantization import calib

    from bevfusion_ptq.quant.compat import iter_quantizers

    for _, q in iter_quantizers(model):
        cal = q._calibrator
        if isinstance(cal, calib.HistogramCalibrator):
            q._calibrator = calib.HistogramCalibrator(cal._num_bits, cal._axis, cal._unsigned)
        elif isinstance(cal, calib.MaxCalibrator):
            q._calibrator = calib.MaxCalibrator(cal._num_bits, cal._axis, cal._unsigned)


def profile(device: torch.device, fn: Callable[[], Any], batches: int, top: int = 15) -> dict[str, Any]:
    """Kernel time, launches, host syncs and the top kernels of ``fn`` (per batch)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    wall0 = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - wall0
    rows = []
    kernel_us = 0.0
    counts: dict[str, int] = {}
    for evt in prof.key_averages():
        dev_us = float(getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0)) or 0.0)
        counts[evt.key] = counts.get(evt.key, 0) + int(evt.count)
        if dev_us > 0 and not evt.key.startswith(("aten::", "cuda")):
            kernel_us += dev_us
            rows.append((dev_us, evt.key, int(evt.count)))
    rows.sort(reverse=True)
    launches = sum(c for k, c in counts.items() if k.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    syncs = sum(c for k, c in counts.items() if k in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"))
    return {
        "batches": batches,
        "wall_ms_per_batch": round(1000 * wall / batches, 2),
        "kernel_ms_per_batch": round(kernel_us / 1000 / batches, 2),
        "kernel_launches_per_batch": round(launches / batches, 1),
        "host_reads_per_batch": round(counts.get("aten::_local_scalar_dense", 0) / batches, 1),
        "stream_syncs_per_batch": round(syncs / batches, 1),
        "top_kernels": [
            {"kernel": k[:90], "ms_per_batch": round(us / 1000 / batches, 3), "calls_per_batch": round(c / batches, 1)}
            for us, k, c in rows[:top]
        ],
    }


def steady_profile(two: dict[str, Any], four: dict[str, Any]) -> dict[str, Any]:
    """Per-batch figures of batches 3 and 4: a 4-batch profile minus a 2-batch one."""
    out: dict[str, Any] = {"batches": 2, "derived": "4-batch profile minus 2-batch profile"}
    for key in ("wall_ms_per_batch", "kernel_ms_per_batch", "kernel_launches_per_batch",
                "host_reads_per_batch", "stream_syncs_per_batch"):
        out[key] = round((4 * four[key] - 2 * two[key]) / 2, 2)
    first = {row["kernel"]: row for row in two["top_kernels"]}
    out["top_kernels"] = [
        {"kernel": row["kernel"],
         "ms_per_batch": round((4 * row["ms_per_batch"] - 2 * first.get(row["kernel"], {}).get("ms_per_batch", 0.0)) / 2, 3),
         "calls_per_batch": round((4 * row["calls_per_batch"] - 2 * first.get(row["kernel"], {}).get("calls_per_batch", 0)) / 2, 1)}
        for row in four["top_kernels"]
    ]
    return out


# ------------------------------------------------------------------------------ phases
Builder = Callable[[bool], torch.nn.Module]  # quantized? -> a BN-folded model on the CPU, eval mode


def config_builder(cfg: Any, checkpoint: Path) -> Builder:
    """Models of a shipped config from one checkpoint, as the pipeline builds them."""

    def build(quantized: bool) -> torch.nn.Module:
        from bevfusion_ptq.model.checkpoint import load_model
        from bevfusion_ptq.quant.fuse import fuse_bn
        from bevfusion_ptq.quant.insert import insert_quantizers
        from bevfusion_ptq.quant.rules import bevfusion_rules

        model = load_model(cfg, checkpoint)
        if quantized:
            insert_quantizers(model, bevfusion_rules())
        fuse_bn(model)
        return model.eval()

    return build


def features(model: torch.nn.Module) -> Callable[[Any], Any]:
    """What calibration runs: everything up to the decoder (the whole model if it has no split)."""
    return getattr(model, "extract_features", None) or model


def floor_phase(build: Builder, batches: list, device: torch.device, a: argparse.Namespace) -> dict:
    from bevfusion_ptq.data.batch import move_batch

    model = build(False).to(device)
    run_features = features(model)
    resident = [move_batch(b, device) for b in batches]
    out: dict[str, Any] = {}
    with torch.no_grad(), calibration_backends(device, benchmark=True):

        def run() -> None:
            for b in resident:
                run_features(b)

        for _ in range(a.warmup):
            run()
        times = [timed(device, run)[0] / len(resident) for _ in range(a.repeats)]
        # Peak with one batch on the device, as ours holds at most two (current + staged).
        one = resident[0]
        del resident
        free(device)
        peak_reset(device)
        result = run_features(one)
        out["peak_gib"] = peak_gib(device)
        out["resident_gib"] = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
        if isinstance(result, dict):
            out["shapes"] = {k: list(v.shape) for k, v in result.items()}
        if a.profile:
            out["profile"] = profile(device, lambda: [run_features(one) for _ in range(2)], 2)
    out["batch_s"] = times
    out["batch_median_s"] = statistics.median(times)
    del model, run_features, one, result
    free(device)
    return out


class RedoCounter(logging.Handler):
    """Counts the batches our collect ran twice because a histogram outgrew its buffer."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0
        self.logger = logging.getLogger("bevfusion_ptq.quant.histogram")
        self.saved_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if "again" in record.getMessage():
            self.count += 1

    def close(self) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved_level)
        super().close()


def ours_phase(build: Builder, batches: list, device: torch.device, a: argparse.Namespace) -> tuple[dict, torch.nn.Module]:
    from bevfusion_ptq.quant.calibrate import collect, compute_amax

    model = build(True).to(device)
    n = len(batches)
    collect_s, amax_s, peaks = [], [], []
    redone = RedoCounter()
    for i in range(a.warmup + a.repeats):
        fresh_calibrators(model)
        free(device)
        peak_reset(device)
        seconds, _ = timed(device, lambda: collect(model, batches, n))
        peak = peak_gib(device)
        amax_seconds, amax = timed(device, lambda: compute_amax(model, "mse"))
        if i >= a.warmup:
            collect_s.append(seconds)
            amax_s.append(amax_seconds)
            peaks.append(peak)
    redone.close()
    out: dict[str, Any] = {
        "redone_batches_per_collect": redone.count / (a.warmup + a.repeats),
        "collect_s": collect_s,
        "collect_median_s": statistics.median(collect_s),
        "batch_median_s": statistics.median(collect_s) / n,
        "amax_s": amax_s,
        "amax_median_s": statistics.median(amax_s),
        "peak_gib": max(peaks) if device.type == "cuda" else None,
        "amax": {k: v.detach().cpu() for k, v in amax.items()},
    }
    # P1_steady: the per-batch time after the first batch (whose sizing and weight reductions
    # a 300-batch calibration pays once) over the floor's.
    out["steady_batch_s"] = per_batch_after_first(device, batches, a, lambda bs: fresh_collect(model, bs))
    out["ablation"] = ablation(model, batches, device, a)
    if a.profile:
        fresh_calibrators(model)
        out["profile"] = profile(device, lambda: collect(model, batches[:2], 2), 2)
        fresh_calibrators(model)
        four = profile(device, lambda: collect(model, batches[:2] * 2, 4), 4)
        out["profile_steady"] = steady_profile(out["profile"], four)
    if device.type == "cuda":
        import os

        from bevfusion_ptq.quant.histogram import BACKEND_ENV

        os.environ[BACKEND_ENV] = "torch"  # the same collect with torch ops instead of the CUDA kernels
        try:
            torch_ops = []
            for _ in range(2):
                fresh_calibrators(model)
                torch_ops.append(timed(device, lambda: collect(model, batches, n))[0] / n)
            out["torch_ops_batch_s"] = min(torch_ops)
            if a.profile:
                fresh_calibrators(model)
                out["torch_ops_profile"] = profile(device, lambda: collect(model, batches[:2], 2), 2)
        finally:
            os.environ.pop(BACKEND_ENV, None)
    out["same_input"] = same_input_check(model, batches, device)
    fresh_calibrators(model)
    collect(model, batches, n)  # leave the full-data histograms for the comparison
    compute_amax(model, "mse")
    return out, model


def fresh_collect(model: torch.nn.Module, batches: list) -> None:
    """Our collect over ``batches`` from empty calibrators."""
    from bevfusion_ptq.quant.calibrate import collect

    fresh_calibrators(model)
    collect(model, batches, len(batches))


def per_batch_after_first(device: torch.device, batches: list, a: argparse.Namespace,
                          run: Callable[[list], Any]) -> float:
    """Seconds per batch of ``run`` after its first batch: ``run`` over the batches twice
    minus ``run`` over them once, divided by their number (medians of ``repeats // 2``)."""
    repeats = max(1, a.repeats // 2)
    once = statistics.median(timed(device, lambda: run(batches))[0] for _ in range(repeats))
    twice = statistics.median(timed(device, lambda: run(batches + batches))[0] for _ in range(repeats))
    return (twice - once) / len(batches)


@contextlib.contextmanager
def without_counting_kernel() -> Iterator[None]:
    """Our collect with the CUDA counting launch replaced by nothing: its host path and
    session stay, the kernel's GPU time goes (the torch-op path, on the CPU, still counts)."""
    from bevfusion_ptq.quant import histogram as hist

    launch = hist._launch_count
    hist._launch_count = lambda *args: None
    try:
        yield
    finally:
        hist._launch_count = launch


def ablation(model: torch.nn.Module, batches: list, device: torch.device, a: argparse.Namespace) -> dict[str, float]:
    """Where ours' time over the floor goes, per batch after the first (:func:`per_batch_after_first`):

    * ``quantizers_off``: the quantized model with every quantizer disabled (pass-through),
      batches moved from pinned memory as ours moves them: the quant modules' own cost;
    * ``collect_no_count``: our collect with the counting launch replaced by nothing: the
      host path of every quantizer call and the session, without the kernel's GPU time;
    * ours itself is ``steady_batch_s``.
    """
    from bevfusion_ptq.quant.calibrate import default_forward
    from bevfusion_ptq.quant.compat import iter_quantizers

    quantizers = [q for _, q in iter_quantizers(model)]
    saved = [q._disabled for q in quantizers]
    try:
        for q in quantizers:
            q._disabled = True
        with torch.no_grad(), calibration_backends(device, benchmark=True):
            off = per_batch_after_first(device, batches, a, lambda bs: [default_forward(model, b) for b in bs])
    finally:
        for q, was in zip(quantizers, saved):
            q._disabled = was
    with without_counting_kernel():
        without = per_batch_after_first(device, batches, a, lambda bs: fresh_collect(model, bs))
    return {"quantizers_off_batch_s": off, "collect_no_count_batch_s": without}


#: Parts of BEVFusion timed on their own by :func:`region_times` (those a model lacks are skipped).
#: Each is a module that BEVFusion's forward calls itself: a container it only indexes
#: (``encoders.lidar``, ``decoder``) runs no hooks.
REGIONS = ("encoders.camera.backbone", "encoders.camera.neck", "encoders.camera.vtransform",
           "encoders.lidar.voxelize", "encoders.lidar.backbone", "fuser", "decoder.backbone", "decoder.neck")


def region_times(model: torch.nn.Module, run: Callable[[], Any], device: torch.device, skip: int) -> dict[str, float]:
    """Milliseconds per call of each region of ``model`` while ``run()`` runs, synchronised
    before and after every region (so each is its own cost, without overlap with the next):
    the median over the calls after the first ``skip`` (a first batch's one-time work)."""
    times: dict[str, list[float]] = {}
    started: dict[str, float] = {}
    hooks = []
    for name in REGIONS:
        try:
            part = model.get_submodule(name)
        except AttributeError:
            continue

        def before(_m: Any, _a: Any, name: str = name) -> None:
            sync(device)
            started[name] = time.perf_counter()

        def after(_m: Any, _a: Any, _o: Any, name: str = name) -> None:
            sync(device)
            times.setdefault(name, []).append(1000 * (time.perf_counter() - started[name]))

        hooks += [part.register_forward_pre_hook(before), part.register_forward_hook(after)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {name: round(statistics.median(v[skip:] or v), 3) for name, v in times.items()}


def side_by_side(build: Builder, ours_model: torch.nn.Module, batches: list, device: torch.device,
                 a: argparse.Namespace) -> dict[str, Any]:
    """P1 from alternating rounds: the floor's forward over the batches, then our collect over
    them, ``repeats`` times, and the median of the per-round ratios.

    Why: the phases above run minutes apart, and on a shared GPU host the same collect has
    varied by 20 % between rounds, far more than the overhead being measured. A ratio of two
    measurements taken seconds apart drifts much less.
    """
    from bevfusion_ptq.data.batch import move_batch

    floor_model = build(False).to(device)
    run_features = features(floor_model)
    resident = [move_batch(b, device) for b in batches]
    n = len(batches)
    floor_s, ours_s = [], []
    with torch.no_grad(), calibration_backends(device, benchmark=True):
        for b in resident:
            run_features(b)  # warm: cuDNN picks its algorithms for this model
    for _ in range(a.repeats):
        with torch.no_grad(), calibration_backends(device, benchmark=True):
            floor_s.append(timed(device, lambda: [run_features(b) for b in resident])[0] / n)
        ours_s.append(timed(device, lambda: fresh_collect(ours_model, batches))[0] / n)
    per_round = [o / f for o, f in zip(ours_s, floor_s)]
    # Where ours' time over the floor goes, region by region (batches on the device for both).
    with torch.no_grad(), calibration_backends(device, benchmark=True):
        floor_regions = region_times(floor_model, lambda: [run_features(b) for b in resident], device, 1)
    ours_regions = region_times(ours_model, lambda: fresh_collect(ours_model, resident), device, 1)
    with without_counting_kernel():
        uncounted = region_times(ours_model, lambda: fresh_collect(ours_model, resident), device, 1)
    return {"floor_batch_s": floor_s, "ours_batch_s": ours_s, "ratios": per_round,
            "P1": statistics.median(per_round),
            "regions_ms": {"floor": floor_regions, "ours": ours_regions, "ours_without_counting_kernel": uncounted}}


def reference_collect(model: torch.nn.Module, batches: list, device: torch.device) -> None:
    """CUDA-BEVFusion lean/quantize.py ``collect_stats``: full forward, library calibrators."""
    from pytorch_quantization import nn as quant_nn

    from bevfusion_ptq.data.batch import move_batch

    model.eval()
    for _, module in model.named_modules():
        if isinstance(module, quant_nn.TensorQuantizer):
            if module._calibrator is not None:
                module.disable_quant()
                module.enable_calib()
            else:
                module.disable()
    with torch.no_grad():
        for batch in batches:
            model(move_batch(batch, device))
    for _, module in model.named_modules():
        if isinstance(module, quant_nn.TensorQuantizer):
            if module._calibrator is not None:
                module.enable_quant()
                module.disable_calib()
            else:
                module.enable()


def reference_amax(model: torch.nn.Module, device: torch.device, budget_s: float) -> dict[str, Any]:
    """CUDA-BEVFusion lean/quantize.py ``compute_amax(model, method="mse")``, within a time budget.

    pytorch-quantization's MSE loop costs a fake quantization and a host read per candidate
    bin, so a histogram that grew to 100k bins takes about a minute. The largest histogram
    runs first, then the others smallest first until ``budget_s`` is spent. The rest are
    timed at the cost per candidate interpolated in the bin count between the measured
    ones (an estimate, reported as such), and their amax is our vectorised MSE on the
    reference's own histogram, which gave the library's answer on every quantizer measured.
    """
    from pytorch_quantization import calib

    from bevfusion_ptq.quant.compat import compute_calibrator_amax, iter_quantizers, set_amax

    shim = cuda_is_identity() if device.type != "cuda" else contextlib.nullcontext()
    quantizers = [(n, q) for n, q in iter_quantizers(model) if q._calibrator is not None]
    histograms = sorted(
        ((n, q) for n, q in quantizers if isinstance(q._calibrator, calib.HistogramCalibrator)),
        key=lambda nq: int(nq[1]._calibrator._num_bins),
    )
    histograms = histograms[-1:] + histograms[:-1]  # the largest first: it anchors the estimate
    measured_s, estimated = 0.0, []
    points: list[tuple[int, float]] = []  # (bins, seconds per candidate) of measured quantizers
    with shim:
        seconds, _ = timed(device, lambda: [
            (q.load_calib_amax(strict=False), setattr(q, "_amax", q._amax.to(device)))
            for _, q in quantizers if isinstance(q._calibrator, calib.MaxCalibrator)
        ])
        measured_s += seconds
        for name, q in histograms:
            candidates = max(0, int(q._calibrator._num_bins) - 128)
            if points and measured_s > budget_s:  # the first (largest) always runs
                estimated.append((name, q, candidates))
                continue

            def one(q: Any = q) -> None:
                q.load_calib_amax(method="mse", strict=False)
                q._amax = q._amax.to(device)

            seconds, _ = timed(device, one)
            measured_s += seconds
            points.append((int(q._calibrator._num_bins), seconds / max(1, candidates)))

    def per_candidate(bins: int) -> float:
        if not points:
            return 0.0
        lo = min(points)
        hi = max(points)
        if hi[0] == lo[0] or bins <= lo[0]:
            return lo[1] if bins <= lo[0] else hi[1]
        return lo[1] + (hi[1] - lo[1]) * min(1.0, (bins - lo[0]) / (hi[0] - lo[0]))

    for _, q, _ in estimated:
        set_amax(q, compute_calibrator_amax(q, "mse"), torch.device(device))
    estimated_s = sum(per_candidate(int(q._calibrator._num_bins)) * c for _, q, c in estimated)
    return {
        "seconds": measured_s + estimated_s,
        "measured_s": measured_s,
        "measured_quantizers": len(histograms) - len(estimated),
        "estimated_quantizers": len(estimated),
        "estimated_s": estimated_s,
        "estimated_names": [n for n, _, _ in estimated],
        "bins": {n: int(q._calibrator._num_bins) for n, q in histograms},
    }


def reference_phase(build: Builder, batches: list, device: torch.device, a: argparse.Namespace) -> tuple[dict, torch.nn.Module]:
    from pytorch_quantization import calib

    from bevfusion_ptq.quant.compat import compute_calibrator_amax, iter_quantizers

    model = build(True).to(device)
    out: dict[str, Any] = {}
    collect_s, peaks = [], []
    logging.getLogger("absl").setLevel(logging.ERROR)  # load_calib_amax warns once per quantizer
    previous: dict[str, Any] = {}
    with calibration_backends(device, benchmark=False):
        for i in range(a.warmup + a.ref_repeats):
            previous = {n: q._calibrator for n, q in iter_quantizers(model)}
            fresh_calibrators(model)
            free(device)
            peak_reset(device)
            seconds, _ = timed(device, lambda: reference_collect(model, batches, device))
            peaks.append(peak_gib(device))
            if i >= a.warmup:
                collect_s.append(seconds)
        # The same loop twice on the same data: how far apart do two runs land by themselves?
        out["run_to_run"] = histogram_agreement(
            {n: q._calibrator for n, q in iter_quantizers(model)}, previous)
        if a.profile:
            saved = {n: q._calibrator for n, q in iter_quantizers(model)}  # the full-data histograms
            fresh_calibrators(model)
            out["profile"] = profile(device, lambda: reference_collect(model, batches[:2], device), 2)
            for n, q in iter_quantizers(model):
                q._calibrator = saved[n]
        amax = reference_amax(model, device, a.ref_amax_budget)
    # Our amax maths on the reference's own histograms (the issue-5 comparison), on the
    # quantizers whose library amax was measured.
    skipped = set(amax["estimated_names"])
    hist_q = [(n, q) for n, q in iter_quantizers(model)
              if isinstance(q._calibrator, calib.HistogramCalibrator) and n not in skipped]
    ours_same_s, ours_same = timed(device, lambda: {n: compute_calibrator_amax(q, "mse") for n, q in hist_q})
    in_bins = []
    for n, q in hist_q:
        edges = q._calibrator._calib_bin_edges
        width = float(edges[1] - edges[0])
        in_bins.append(abs(float(ours_same[n]) - float(q._amax)) / width if width > 0 else 0.0)
    hist_s = amax["measured_s"]  # includes the max quantizers' loads, which are negligible
    out.update({
        "collect_s": collect_s,
        "collect_median_s": statistics.median(collect_s),
        "batch_median_s": statistics.median(collect_s) / len(batches),
        "amax_s": amax["seconds"],
        "amax_detail": {k: v for k, v in amax.items() if k != "bins"},
        "histogram_bins": {"min": min(amax["bins"].values(), default=0), "max": max(amax["bins"].values(), default=0),
                           "median": statistics.median(amax["bins"].values()) if amax["bins"] else 0,
                           "over_8192": sum(1 for b in amax["bins"].values() if b > 8192)},
        "peak_gib": max(peaks) if device.type == "cuda" else None,
        "amax": {n: q._amax.detach().cpu() for n, q in iter_quantizers(model) if hasattr(q, "_amax")},
        "same_histograms": {
            "quantizers": len(hist_q),
            "pytorch_quantization_mse_s": hist_s,
            "ours_mse_s": ours_same_s,
            "speedup": hist_s / ours_same_s if ours_same_s > 0 else None,
            "max_diff_in_bin_widths": max(in_bins) if in_bins else None,
            "identical": sum(1 for d in in_bins if d == 0.0),
        },
    })
    return out, model


# ---------------------------------------------------------------------------- compare
def histogram_agreement(mine: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """MSE amax (our maths) of two sets of histogram calibrators, in bins of ``theirs``."""
    from pytorch_quantization import calib

    from bevfusion_ptq.quant.amax import compute_amax

    diffs, same_bins, moved_share = [], 0, []
    for name, cal in mine.items():
        other = theirs.get(name)
        if not isinstance(cal, calib.HistogramCalibrator) or not isinstance(other, calib.HistogramCalibrator):
            continue
        if cal._calib_hist is None or other._calib_hist is None:
            continue
        a = compute_amax(cal._calib_hist, cal._calib_bin_edges, "mse", num_bits=8, unsigned=False)
        b = compute_amax(other._calib_hist, other._calib_bin_edges, "mse", num_bits=8, unsigned=False)
        width = float(other._calib_bin_edges[1] - other._calib_bin_edges[0])
        diffs.append((abs(float(a) - float(b)) / width if width > 0 else 0.0, name))
        h1, h2 = cal._calib_hist.float().cpu(), other._calib_hist.float().cpu()
        same_bins += int(h1.numel() == h2.numel())
        k = min(h1.numel(), h2.numel())
        moved = float((h1[:k] - h2[:k]).abs().sum() + h1[k:].sum() + h2[k:].sum()) / 2
        moved_share.append(moved / max(float(h2.sum()), 1.0))
    diffs.sort(reverse=True)
    return {
        "histogram_quantizers": len(diffs),
        "amax_beyond_one_bin": sum(1 for d, _ in diffs if d > 1.0),
        "amax_identical": sum(1 for d, _ in diffs if d == 0.0),
        "amax_max_diff_in_bins": diffs[0][0] if diffs else None,
        "worst": [{"quantizer": n, "bins": round(d, 2)} for d, n in diffs[:3]],
        "same_bin_count": same_bins,
        "counts_moved_max_share": max(moved_share) if moved_share else None,
    }


def same_input_check(model: torch.nn.Module, batches: list, device: torch.device) -> dict[str, Any]:
    """Our collect and pytorch-quantization's calibrators fed the very same tensors.

    Hooks hand every quantizer's input to a library calibrator as well, during one of our
    collections: this isolates the calibrator from run-to-run differences of the forward.
    """
    from pytorch_quantization import calib

    from bevfusion_ptq.quant.calibrate import collect
    from bevfusion_ptq.quant.compat import iter_quantizers

    fresh_calibrators(model)
    library: dict[str, Any] = {}
    handles = []
    for name, q in iter_quantizers(model):
        cal = q._calibrator
        twin = (calib.HistogramCalibrator(cal._num_bits, cal._axis, cal._unsigned)
                if isinstance(cal, calib.HistogramCalibrator) else calib.MaxCalibrator(cal._num_bits, cal._axis, cal._unsigned))
        library[name] = twin
        handles.append(q.register_forward_pre_hook(lambda _m, args, twin=twin: twin.collect(args[0])))
    try:
        collect(model, batches, len(batches))
    finally:
        for handle in handles:
            handle.remove()
    ours = {n: q._calibrator for n, q in iter_quantizers(model)}
    out = histogram_agreement(ours, library)
    out["max_quantizers_equal"] = sum(
        1 for n, cal in ours.items()
        if isinstance(cal, calib.MaxCalibrator) and torch.equal(cal._calib_amax, library[n]._calib_amax))
    out["max_quantizers"] = sum(1 for cal in ours.values() if isinstance(cal, calib.MaxCalibrator))
    return out


def kernel_self_check(device: torch.device) -> dict[str, Any]:
    """The CUDA counting kernel against the torch-op path on the same data.

    Compared after every tensor, with ranges growing up to 800-fold, so that a difference
    is located at the step that made it.
    """
    import os

    from bevfusion_ptq.quant import histogram as hist

    gen = torch.Generator().manual_seed(0)
    data = [torch.relu(torch.randn(3_000_000, generator=gen)).to(device),
            (torch.randn(1_000_000, generator=gen) * 2.5).to(device),
            (torch.randn(50_000, generator=gen) * 40).to(device),
            torch.tensor([0.0, 1.0, 2.0, 4096.0], device=device)]
    saved = os.environ.get(hist.BACKEND_ENV)
    calibrators = []
    try:
        for backend in ("torch", ""):
            os.environ[hist.BACKEND_ENV] = backend
            calibrators.append(hist.SyncFreeHistogramCalibrator(8, None, False))
        steps = []
        for x in data:
            for backend, cal in zip(("torch", ""), calibrators):
                os.environ[hist.BACKEND_ENV] = backend
                cal.collect(x)
            a, b = (c._calib_hist.float().cpu() for c in calibrators)
            k = min(a.numel(), b.numel())
            diff = (a[:k] - b[:k]).nonzero().flatten()
            steps.append({
                "num_bins": [calibrators[0]._num_bins, calibrators[1]._num_bins],
                "capacity": [calibrators[0]._capacity, calibrators[1]._capacity],
                "equal": bool(a.numel() == b.numel() and torch.equal(a, b)),
                "differing_bins": int(diff.numel()),
                "first_diffs": [(int(i), float(a[i]), float(b[i])) for i in diff[:4]],
                "totals": [float(a.sum()), float(b.sum())],
            })
    finally:
        if saved is None:
            os.environ.pop(hist.BACKEND_ENV, None)
        else:
            os.environ[hist.BACKEND_ENV] = saved
    return {"kernels_available": hist.kernels_available(device), "hist_equal": all(s["equal"] for s in steps),
            "steps": steps}


def agreement(ours_model: torch.nn.Module, ref_model: torch.nn.Module, ours_amax: dict, ref_amax: dict) -> dict:
    """amax of ours against the reference, and how far the histograms' counts moved."""
    from pytorch_quantization import calib

    from bevfusion_ptq.quant.compat import iter_quantizers

    ref_q = dict(iter_quantizers(ref_model))
    hist_rel, hist_bins, max_rel = [], [], []
    worst: list[tuple[float, str]] = []
    moved_share, same_bins = [], 0
    for name, q in iter_quantizers(ours_model):
        if name not in ours_amax or name not in ref_amax:
            continue
        mine, theirs = ours_amax[name].float(), ref_amax[name].float().reshape(ours_amax[name].shape)
        rel = float(((mine - theirs).abs() / theirs.abs().clamp_min(1e-30)).max())
        if isinstance(q._calibrator, calib.HistogramCalibrator):
            ref_cal = ref_q[name]._calibrator
            edges = ref_cal._calib_bin_edges
            width = float(edges[1] - edges[0])
            hist_rel.append(rel)
            hist_bins.append(abs(float(mine) - float(theirs)) / width)
            worst.append((hist_bins[-1], name))
            a, b = q._calibrator._calib_hist.float().cpu(), ref_cal._calib_hist.float().cpu()
            same_bins += int(a.numel() == b.numel())
            k = min(a.numel(), b.numel())
            moved = float((a[:k] - b[:k]).abs().sum() + a[k:].sum() + b[k:].sum()) / 2
            moved_share.append(moved / max(float(b.sum()), 1.0))
        else:
            max_rel.append(rel)
    worst.sort(reverse=True)
    return {
        "histogram_quantizers": len(hist_rel),
        "histogram_max_rel_diff": max(hist_rel) if hist_rel else None,
        "histogram_beyond_one_bin": sum(1 for d in hist_bins if d > 1.0),
        "histogram_identical_amax": sum(1 for r in hist_rel if r == 0.0),
        "histogram_max_diff_in_bins": max(hist_bins) if hist_bins else None,
        "worst": [{"quantizer": n, "bins": round(d, 2)} for d, n in worst[:5]],
        "histograms_same_bin_count": same_bins,
        "histogram_counts_moved_max_share": max(moved_share) if moved_share else None,
        "max_quantizers": len(max_rel),
        "max_max_rel_diff": max(max_rel) if max_rel else None,
    }


def quantizer_counts(model: torch.nn.Module, exclude: tuple[str, ...]) -> dict:
    from pytorch_quantization import calib

    from bevfusion_ptq.quant.compat import iter_quantizers
    from bevfusion_ptq.quant.insert import apply_exclusions

    apply_exclusions(model, exclude)
    qs = [q for _, q in iter_quantizers(model)]
    return {
        "distinct": len(qs),
        "histogram": sum(isinstance(q._calibrator, calib.HistogramCalibrator) for q in qs),
        "max": sum(isinstance(q._calibrator, calib.MaxCalibrator) for q in qs),
        "disabled_after_default_exclusions": sum(bool(q._disabled) for q in qs),
    }


def nan_self_check(device: torch.device) -> dict:
    """The reductions the sync-free collect relies on must propagate NaN and inf here."""
    x = torch.ones(1 << 20, device=device)
    x[12345] = float("nan")
    y = torch.ones(1 << 20, device=device)
    y[777] = float("inf")
    return {
        "amax_nan": math.isnan(float(torch.amax(x))),
        "vector_norm_inf_nan": math.isnan(float(torch.linalg.vector_norm(x, float("inf")))),
        "amax_inf": math.isinf(float(torch.amax(y))),
        "vector_norm_inf_inf": math.isinf(float(torch.linalg.vector_norm(y, float("inf")))),
    }


# ------------------------------------------------------------------------------- report
def ratios(r: dict) -> dict:
    out = {
        "P1": r["ours"]["batch_median_s"] / r["floor"]["batch_median_s"],
        "P1_steady": r["ours"]["steady_batch_s"] / r["floor"]["batch_median_s"],
        "P6": (r["ours"]["peak_gib"] / r["floor"]["peak_gib"]) if r["floor"].get("peak_gib") else None,
    }
    if "side_by_side" in r:
        out["P1_side_by_side"] = r["side_by_side"]["P1"]
    if "reference" not in r:  # --no-reference
        return out
    ours_total = r["ours"]["collect_median_s"] + r["ours"]["amax_median_s"]
    ref_total = r["reference"]["collect_median_s"] + r["reference"]["amax_s"]
    out["P2"] = ref_total / ours_total
    out["P3"] = r["reference"]["amax_s"] / r["ours"]["amax_median_s"]
    # The same totals for a 300-batch calibration, from the measured per-batch times.
    n = 300
    out["P2_at_300_batches"] = (n * r["reference"]["batch_median_s"] + r["reference"]["amax_s"]) / (
        n * r["ours"]["batch_median_s"] + r["ours"]["amax_median_s"])
    out["reference_batch_over_ours_batch"] = r["reference"]["batch_median_s"] / r["ours"]["batch_median_s"]
    # Counting only the library amax time actually measured (no estimate): lower bounds.
    measured = r["reference"]["amax_detail"]["measured_s"]
    out["P2_lower_bound"] = (r["reference"]["collect_median_s"] + measured) / ours_total
    out["P3_lower_bound"] = measured / r["ours"]["amax_median_s"]
    return out


def verdicts(rat: dict) -> dict:
    met = {}
    for key, (op, goal) in GOALS.items():
        value = rat.get(key)
        met[key] = None if value is None else (value <= goal if op == "<=" else value >= goal)
    return met


def num(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(r: dict) -> str:
    f, o, ref = r["floor"], r["ours"], r.get("reference")
    n = r["batches"]

    def gib(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        f"{'':22s} {'per batch ms':>12s} {f'{n} batches s':>12s} {'amax s':>9s} {'total s':>9s} {'peak GiB':>9s}",
        f"{'floor (FP32 forward)':22s} {1000 * f['batch_median_s']:12.1f} {n * f['batch_median_s']:12.3f} "
        f"{'-':>9s} {'-':>9s} {gib(f.get('peak_gib')):>9s}",
        f"{'ours collect + amax':22s} {1000 * o['batch_median_s']:12.1f} {o['collect_median_s']:12.3f} "
        f"{o['amax_median_s']:9.3f} {o['collect_median_s'] + o['amax_median_s']:9.3f} {gib(o.get('peak_gib')):>9s}",
        f"{'ours after batch 1':22s} {1000 * o['steady_batch_s']:12.1f} {'-':>12s} {'-':>9s} {'-':>9s} {'-':>9s}",
    ]
    if ref is not None:
        lines.append(
            f"{'reference loop':22s} {1000 * ref['batch_median_s']:12.1f} {ref['collect_median_s']:12.3f} "
            f"{ref['amax_s']:9.3f} {ref['collect_median_s'] + ref['amax_s']:9.3f} {gib(ref.get('peak_gib')):>9s}")
        detail = ref["amax_detail"]
        if detail["estimated_quantizers"]:
            lines.append(
                f"  (reference amax: {detail['measured_quantizers']} histogram quantizers measured in "
                f"{detail['measured_s']:.1f} s (the largest among them), the other {detail['estimated_quantizers']} "
                f"estimated at the measured cost per candidate bin: {detail['estimated_s']:.1f} s)"
            )
    lines.append("")
    rat, met = r["ratios"], r["goals_met"]
    for key, (op, goal) in GOALS.items():
        value = rat.get(key)
        shown = "-" if value is None else f"{value:.3f}"
        verdict = "-" if met[key] is None else ("met" if met[key] else "NOT met")
        lines.append(f"{key} = {shown:>9s}   goal {op} {goal:<5}  {verdict}")
    lines.append(f"P1 after the first batch (a {2 * n}-batch collect minus a {n}-batch one) = {rat['P1_steady']:.3f}")
    sbs = r.get("side_by_side")
    if sbs:
        lines.append(f"P1 side by side ({len(sbs['ratios'])} alternating rounds of floor and ours, median of the "
                     f"per-round ratios) = {sbs['P1']:.3f} (rounds {min(sbs['ratios']):.3f} to {max(sbs['ratios']):.3f})")
        regions = sbs["regions_ms"]
        if regions["floor"]:
            lines.append("  per region, ms per batch after the first (synchronised around each region): "
                         "floor / ours / ours without the counting kernel")
            for name, ms in regions["floor"].items():
                lines.append(f"    {name:28s} {ms:8.2f} {regions['ours'].get(name, float('nan')):8.2f} "
                             f"{regions['ours_without_counting_kernel'].get(name, float('nan')):8.2f}")
    ab = o.get("ablation")
    if ab:
        lines.append(
            f"  after the first batch, per batch: floor {1000 * f['batch_median_s']:.1f} ms, quantized model with "
            f"quantizers off {1000 * ab['quantizers_off_batch_s']:.1f} ms, our collect without the counting kernel "
            f"{1000 * ab['collect_no_count_batch_s']:.1f} ms, ours {1000 * o['steady_batch_s']:.1f} ms")
    if ref is not None:
        lines.append(f"P2 at 300 batches (from per-batch times) = {rat['P2_at_300_batches']:.2f}; "
                     f"reference batch / ours batch = {rat['reference_batch_over_ours_batch']:.2f}")
        lines.append(f"counting only the measured part of the reference amax: P2 >= {rat['P2_lower_bound']:.1f}, "
                     f"P3 >= {rat['P3_lower_bound']:.1f}")
    qc = r["quantizers"]
    lines += [
        "",
        f"quantizers: {qc['distinct']} distinct ({qc['histogram']} histogram, {qc['max']} max), "
        f"{qc['disabled_after_default_exclusions']} disabled after the default exclusions",
    ]
    if ref is not None:
        ag = r["agreement"]
        lines.append(
            f"amax ours vs reference: max rel diff {ag['histogram_max_rel_diff']:.3g} (histogram), "
            f"{ag['max_max_rel_diff']:.3g} (max); {ag['histogram_beyond_one_bin']} of {ag['histogram_quantizers']} "
            f"histogram quantizers differ by more than one bin width; {ag['histogram_identical_amax']} identical")
    si = r["ours"]["same_input"]
    lines.append(
        f"same input tensors, ours vs pytorch-quantization: {si['amax_beyond_one_bin']} of "
        f"{si['histogram_quantizers']} MSE amax differ by more than one bin (max {num(si['amax_max_diff_in_bins'])} bins, "
        f"{si['amax_identical']} identical), bin counts equal for {si['same_bin_count']}, max share of counts moved "
        f"{num(si['counts_moved_max_share'], '.2g')}; max quantizers equal {si['max_quantizers_equal']}/{si['max_quantizers']}"
    )
    if ref is not None:
        rr = ref["run_to_run"]
        lines.append(
            f"reference against itself (two runs of its loop): {rr['amax_beyond_one_bin']} of {rr['histogram_quantizers']} "
            f"MSE amax differ by more than one bin (max {num(rr['amax_max_diff_in_bins'])} bins)"
        )
    if "torch_ops_batch_s" in r["ours"]:
        lines.append(f"ours with torch ops instead of the CUDA kernel: {1000 * r['ours']['torch_ops_batch_s']:.1f} ms "
                     f"per batch (P1 would be {r['ours']['torch_ops_batch_s'] / f['batch_median_s']:.2f})")
    same = ref["same_histograms"] if ref is not None else {"quantizers": 0}
    if same["quantizers"]:
        lines.append(
            f"amax maths on the same (reference) histograms, {same['quantizers']} quantizers: ours "
            f"{same['ours_mse_s']:.3f} s vs pytorch-quantization's MSE loop {same['pytorch_quantization_mse_s']:.1f} s "
            f"(x{same['speedup']:.0f}); {same['identical']} identical, max diff {same['max_diff_in_bin_widths']} "
            "bin widths"
        )
    return "\n".join(lines)


def measure(build: Builder, batches: list, device: torch.device, a: argparse.Namespace,
            exclude: tuple[str, ...], r: dict[str, Any] | None = None,
            save: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """All three phases on ``batches``; the ratios, agreement and quantizer counts.

    ``save(r)`` runs after each phase, so a run cut short still leaves what it measured.
    """
    r = {} if r is None else r
    r["batches"] = len(batches)
    save = save or (lambda _r: None)
    t_all = time.perf_counter()
    if device.type == "cuda":
        r["nan_self_check"] = nan_self_check(device)
        r["kernel_self_check"] = kernel_self_check(device)
        print(f"kernel self-check: {json.dumps(r['kernel_self_check'])}", flush=True)
    r["floor"] = floor_phase(build, batches, device, a)
    save(r)
    print(f"floor done ({time.perf_counter() - t_all:.0f} s)", flush=True)
    ours, ours_model = ours_phase(build, batches, device, a)
    ours_amax = ours.pop("amax")
    r["ours"] = ours
    save(r)
    r["side_by_side"] = side_by_side(build, ours_model, batches, device, a)
    free(device)  # the floor model and its resident batches went with side_by_side's frame
    save(r)
    ours_model.cpu()
    free(device)
    print(f"ours done ({time.perf_counter() - t_all:.0f} s)", flush=True)
    if a.reference:
        ref, ref_model = reference_phase(build, batches, device, a)
        ref_amax = ref.pop("amax")
        r["reference"] = ref
        save(r)
        print(f"reference done ({time.perf_counter() - t_all:.0f} s)", flush=True)
        r["agreement"] = agreement(ours_model, ref_model, ours_amax, ref_amax)
    r["quantizers"] = quantizer_counts(ours_model, exclude)
    r["ratios"] = ratios(r)
    r["goals_met"] = verdicts(r["ratios"])
    r["bench_seconds"] = round(time.perf_counter() - t_all, 1)
    r["table"] = table(r)
    return r


def print_profiles(r: dict) -> None:
    for phase, key in (("floor", "profile"), ("ours", "profile"), ("ours", "profile_steady"),
                       ("ours", "torch_ops_profile"), ("reference", "profile")):
        prof = r.get(phase, {}).get(key)
        if prof:
            print(f"\nprofile {phase} ({key}): wall {prof['wall_ms_per_batch']} ms/batch, kernels {prof['kernel_ms_per_batch']} "
                  f"ms/batch, {prof['kernel_launches_per_batch']} launches/batch, "
                  f"{prof['host_reads_per_batch']} host reads/batch, {prof['stream_syncs_per_batch']} stream syncs/batch")
            for row in prof["top_kernels"][:10]:
                print(f"   {row['ms_per_batch']:8.3f} ms  x{row['calls_per_batch']:<7} {row['kernel']}")


def options(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="bevfusion-tiny with few points (a quick check, CPU is fine)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, default=None, help="batches per calibration (default 8, small: 3)")
    ap.add_argument("--points", type=int, default=None, help="lidar points per batch (default 250000, small: 4000)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats of floor and ours (default 5, small: 2)")
    ap.add_argument("--ref-repeats", type=int, default=None,
                    help="timed repeats of the reference collect (default 3, small: 1)")
    ap.add_argument("--ref-amax-budget", type=float, default=None,
                    help="seconds of pytorch-quantization's MSE loop to measure; the rest is estimated "
                         "(default 150, small: 20)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="skip the reference loop (P2, P3 and the agreement with it): floor and ours only")
    ap.add_argument("--out", type=Path, default=Path("bench-calibration"))
    a = ap.parse_args(argv)
    a.batches = a.batches or (3 if a.small else 8)
    a.points = a.points or (4000 if a.small else 250_000)
    a.repeats = a.repeats or (2 if a.small else 5)
    a.ref_repeats = a.ref_repeats or (1 if a.small else 3)
    a.ref_amax_budget = a.ref_amax_budget if a.ref_amax_budget is not None else (20.0 if a.small else 150.0)
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = options(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # pytorch-quantization warns per quantizer toggle
    device = torch.device(a.device)
    a.out.mkdir(parents=True, exist_ok=True)

    from bevfusion_ptq.data.batch import random_batch
    from bevfusion_ptq.model.checkpoint import make_checkpoint
    from bevfusion_ptq.model.config import load_config
    from bevfusion_ptq.quant.rules import DEFAULT_EXCLUDE

    name = "bevfusion-tiny" if a.small else "bevfusion-r50"
    cfg = load_config(name)
    batches = [random_batch(cfg, num_points=a.points, seed=i) for i in range(a.batches)]
    if device.type == "cuda":
        batches = [pin(b) for b in batches]
    r: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "command": "python3 bench/calibration.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "setup": {
            "model": name,
            "weights": "random, reference layout (make_checkpoint seed 0), BN folded",
            "data": "in-memory random batches (random_batch), pinned host memory for ours/reference, "
                    "already on the device for the floor",
            "image": list(batches[0]["img"].shape),
            "points": a.points,
            "batches": a.batches,
            "repeats": a.repeats,
            "reference_repeats": a.ref_repeats,
            "warmup": a.warmup,
            "tf32": False,
            "cudnn_benchmark": {"floor": True, "ours": True, "reference": False},
        },
    }
    target = a.out / "calibration.json"

    def save(partial: dict) -> None:
        target.write_text(json.dumps(partial, indent=2, default=str))

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"{name}.pth"
        make_checkpoint(ckpt, cfg, seed=0)
        try:
            measure(config_builder(cfg, ckpt), batches, device, a, DEFAULT_EXCLUDE, r, save)
        except BaseException as exc:
            r["error"] = repr(exc)
            save(r)
            raise
    print(r["table"])
    print_profiles(r)
    save(r)
    return r


if __name__ == "__main__":
    main()
