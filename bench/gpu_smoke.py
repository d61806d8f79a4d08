"""GPU evidence on the device machine: the PTQ stages on CUDA, and BEVFusion-R50 at full size.

Runs the library's stage functions directly (the device has no Prefect), then:
- a bevfusion-r50 forward at the reference shapes (6x3x256x704 images, ~250k points as from
  10 merged sweeps; in-memory random batches of those shapes), median of 20 after warm-up,
  with peak GPU memory;
- bevfusion-r50 calibration on such batches, and the amax computation of our vectorised MSE
  against pytorch-quantization's own loop on the same histograms.

Prints a summary and writes it as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("gpu_smoke")


def timed(fn, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return times


def skeleton_on_cuda(out: Path) -> dict:
    from bevfusion_ptq import pipeline
    from bevfusion_ptq.params import PTQParams
    from bevfusion_ptq.workdir import load_model

    params = PTQParams(device="cuda", calib_batches=4, output=str(out / "artifacts"))
    t0 = time.perf_counter()
    ckpt, data, ref = pipeline.calibrated_in_process(params)
    device = pipeline.resolve_device(params.device)
    fidelity = pipeline.fidelity_stage(params, ref, data)
    saved = pipeline.save_artifacts_stage(params, ref, ckpt, data, fidelity)
    model = load_model(ref).to(device)
    amax = [b for n, b in model.named_buffers() if n.endswith("_amax")]
    return {
        "calibration_device": str(device),
        "amax_buffers": len(amax),
        "amax_all_finite_positive": all(bool(torch.isfinite(a).all() and (a > 0).all()) for a in amax),
        "version_dir": str(saved.path),
        "files": [f["name"] for f in saved.manifest["files"]],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def r50_forward(num_points: int) -> dict:
    from bevfusion_ptq.data.batch import move_batch, random_batch
    from bevfusion_ptq.model.checkpoint import load_model, make_checkpoint
    from bevfusion_ptq.model.config import load_config

    cfg = load_config("bevfusion-r50")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r50.pth"
        make_checkpoint(path, cfg, seed=0)
        model = load_model(cfg, path).cuda().eval()
    batch = move_batch(random_batch(cfg, num_points=num_points, seed=0), "cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = model(batch)
        times = timed(lambda: model(batch), repeats=20, warmup=3)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {
        "points": num_points,
        "image": list(batch["img"].shape),
        "camera_bev": list(out["camera_bev"].shape),
        "lidar_bev": list(out["lidar_bev"].shape),
        "decoder_out": list(out["decoder_out"].shape),
        "boxes": int(out["boxes"][0]["score"].numel()),
        "finite": bool(torch.isfinite(out["decoder_out"]).all()),
        "forward_median_ms": round(1000 * statistics.median(times), 2),
        "forward_min_ms": round(1000 * min(times), 2),
        "peak_gpu_gib": round(peak, 2),
    }, model, cfg


def r50_calibration(model, cfg, num_points: int, batches: int, compare: int) -> dict:
    from pytorch_quantization import calib
    from pytorch_quantization.calib.histogram import _compute_amax_mse

    from bevfusion_ptq.data.batch import random_batch
    from bevfusion_ptq.quant.amax import compute_amax
    from bevfusion_ptq.quant.calibrate import calibrate
    from bevfusion_ptq.quant.compat import iter_quantizers
    from bevfusion_ptq.quant.fuse import fuse_bn
    from bevfusion_ptq.quant.insert import insert_quantizers
    from bevfusion_ptq.quant.rules import bevfusion_rules

    plan = insert_quantizers(model, bevfusion_rules())
    fuse_bn(model)
    model.cuda().eval()
    data = [random_batch(cfg, num_points=num_points, seed=i) for i in range(batches)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = calibrate(model, data, method="mse", num_batches=batches)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0

    hist_q = [(n, q) for n, q in iter_quantizers(model) if isinstance(q._calibrator, calib.HistogramCalibrator)]
    sample = hist_q[:compare]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ours = [compute_amax(q._calibrator._calib_hist, q._calibrator._calib_bin_edges, "mse", num_bits=8, unsigned=False)
            for _, q in sample]
    torch.cuda.synchronize()
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = [
        _compute_amax_mse(q._calibrator._calib_hist.int().cpu().numpy(), q._calibrator._calib_bin_edges.cpu().numpy(), 8, False)
        for _, q in sample
    ]
    torch.cuda.synchronize()
    theirs_s = time.perf_counter() - t0
    widths = [float(q._calibrator._calib_bin_edges[1] - q._calibrator._calib_bin_edges[0]) for _, q in sample]
    diffs = [abs(float(a) - float(b)) for a, b in zip(ours, theirs)]
    return {
        "quantized_modules": len(plan.modules),
        "quantizers": len(list(iter_quantizers(model))),
        "histogram_quantizers": len(hist_q),
        "batches": batches,
        "calibrate_total_s": round(total, 2),
        "amax_compare_quantizers": len(sample),
        "amax_ours_s": round(ours_s, 4),
        "amax_pytorch_quantization_s": round(theirs_s, 2),
        "amax_speedup": round(theirs_s / ours_s, 1) if ours_s > 0 else None,
        "amax_max_abs_diff_in_bin_widths": round(max(d / w for d, w in zip(diffs, widths)), 3) if sample else None,
        "amax_values": len(result.amax),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("gpu-smoke"))
    ap.add_argument("--points", type=int, default=250_000)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--compare", type=int, default=20, help="quantizers for the amax timing comparison")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a.out.mkdir(parents=True, exist_ok=True)
    report = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    # Each part reports its own failure and the next still runs: one device call, all evidence.
    try:
        report["skeleton"] = skeleton_on_cuda(a.out)
        log.info("skeleton: %s", report["skeleton"])
    except Exception as exc:  # noqa: BLE001
        log.exception("skeleton failed")
        report["skeleton"] = {"error": repr(exc)}
    try:
        report["r50_forward"], model, cfg = r50_forward(a.points)
        log.info("r50 forward: %s", report["r50_forward"])
        report["r50_calibration"] = r50_calibration(model, cfg, a.points, a.calib_batches, a.compare)
    except Exception as exc:  # noqa: BLE001
        log.exception("r50 failed")
        report["r50_error"] = repr(exc)
    (a.out / "gpu_smoke.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
