"""Calibration quality of bevfusion-tiny: random weights against the trained default.

For each checkpoint, histograms are collected once on the generated demo tree (train split,
as a default run does), then every method turns them into amax and the fidelity report
compares INT8 with FP32 on held-out val keyframes. Printed per checkpoint and method: the
fidelity summary (stage cosine / relative L2, heatmap, box agreement) and, for the default
method, the quantizers whose amax clips the largest share of values. Histogram plots of the
default method are written too.

    python bench/calibration_quality.py --out DIR [--batches 8] [--fidelity-batches 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

from bevfusion_ptq.data import build_calibration_set, make_dataset
from bevfusion_ptq.model.checkpoint import load_model, make_checkpoint
from bevfusion_ptq.model.config import load_config
from bevfusion_ptq.model.embedded import embedded_checkpoint
from bevfusion_ptq.quant import compat
from bevfusion_ptq.quant.calibrate import METHODS, calibrate, compute_amax
from bevfusion_ptq.quant.fidelity import fidelity_report
from bevfusion_ptq.quant.fuse import fuse_bn
from bevfusion_ptq.quant.insert import apply_exclusions, insert_quantizers
from bevfusion_ptq.quant.plots import clipped_share, plot_histograms
from bevfusion_ptq.quant.rules import DEFAULT_EXCLUDE, bevfusion_rules


def _clipping(model: torch.nn.Module, top: int) -> list[dict]:
    rows = []
    for name, q in compat.iter_quantizers(model):
        cal = getattr(q, "_calibrator", None)
        hist = getattr(cal, "_calib_hist", None)
        if hist is None or q._disabled or q._amax is None or q._amax.numel() != 1:
            continue
        hist, edges = torch.as_tensor(hist).float().cpu(), torch.as_tensor(cal._calib_bin_edges).float().cpu()
        n = min(hist.numel(), edges.numel() - 1)
        share = clipped_share(hist[:n], edges[: n + 1], float(q._amax))
        rows.append({"quantizer": name, "amax": round(float(q._amax), 5), "max_seen": round(float(edges[n]), 5),
                     "clipped_share": share})
    rows.sort(key=lambda r: -r["clipped_share"])
    return rows[:top]


def measure(checkpoint: Path, root: Path, batches: int, fidelity_batches: int, plots: Path) -> dict:
    cfg = load_config("bevfusion-tiny")
    model = load_model(cfg, checkpoint)
    insert_quantizers(model, bevfusion_rules())
    fuse_bn(model)
    train = build_calibration_set(root, None, cfg.data, batches)
    val = build_calibration_set(root, root / "nuscenes_infos_val.pkl", cfg.data, fidelity_batches)
    calibrate(model, train.loader(num_workers=0), method="mse", num_batches=batches)
    apply_exclusions(model, DEFAULT_EXCLUDE)
    result: dict = {"methods": {}}
    for method in METHODS:
        compute_amax(model, method)
        report = fidelity_report(model, val.loader(num_workers=0), num_batches=fidelity_batches)
        result["methods"][method] = report.summary() | {
            "stages": {s.name: {"cosine": round(s.cosine_mean, 6), "rel_l2": round(s.rel_l2_mean, 5)}
                       for s in report.stages}
        }
        if method == "mse":
            result["most_clipped_mse"] = _clipping(model, top=8)
            plot_histograms(model, plots, method="mse")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--fidelity-batches", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # exact, repeatable CPU sums
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_dataset(root, scenes=2, frames=10, seed=0)  # the default run's tree
        random_ckpt = Path(tmp) / "random.pth"
        make_checkpoint(random_ckpt, load_config("bevfusion-tiny"), seed=0)
        trained = embedded_checkpoint("bevfusion-tiny")
        report = {
            name: measure(path, root, args.batches, args.fidelity_batches, args.out / f"plots-{name}")
            for name, path in (("random", random_ckpt), ("trained", trained))
            if path is not None
        }
    (args.out / "calibration_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
