"""Methods, auto and per-group sensitivity on one model: the tables of issue 18.

    PYTHONPATH=$PWD python bench/sensitivity_analysis.py --out DIR                      # tiny, random weights, CPU
    PYTHONPATH=$PWD python bench/sensitivity_analysis.py --checkpoint tiny.pth --out DIR # the trained tiny
    PYTHONPATH=$PWD python bench/sensitivity_analysis.py --config bevfusion-r50 --checkpoint r50.pth \\
        --data-root /data/nuscenes --device cuda --calib-batches 300 --heldout-batches 8 --out DIR

The pipeline's own stage functions, in one process, under ``BEVFUSION_PTQ_HOME`` (default: a
fresh temporary directory): statistics are collected once, then

1. every single method (mse, entropy, percentile 99.9 / 99.99 / 99.999, max) and ``auto``
   go through compute-amax (timed: the warm method change, no collection); the fidelity
   report compares each with FP32 on the held-out batches, and the evaluate stage scores
   each with nuScenes mAP/NDS on the val keyframes (default exclusions);
2. ``auto`` against each single method: quantizer wins, and the fidelity deltas;
3. the reference's two exclusions are measured with the sensitivity metric; that drop is
   the target for which the sensitivity stage proposes its own list (timed: the analysis);
4. the ten most sensitive groups.

Prints markdown tables and writes them with the raw numbers to ``DIR/sensitivity_analysis.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from bevfusion_ptq import pipeline
from bevfusion_ptq.data.batch import move_batch
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.amax_stage import calibrated_model
from bevfusion_ptq.pipeline.heldout import heldout_set
from bevfusion_ptq.pipeline.sensitivity_stage import make_metric
from bevfusion_ptq.quant.fidelity import fidelity_report
from bevfusion_ptq.quant.rules import DEFAULT_EXCLUDE
from bevfusion_ptq.quant.sensitivity import measure_exclusions
from bevfusion_ptq.workdir import load_model

METHODS: tuple[tuple[str, float], ...] = (
    ("mse", 99.99), ("entropy", 99.99), ("percentile", 99.9), ("percentile", 99.99), ("percentile", 99.999),
    ("max", 99.99), ("auto", 99.99),
)


def _label(method: str, percentile: float) -> str:
    return f"percentile-{percentile:g}" if method == "percentile" else method


def _table(header: list[str], rows: list[list]) -> str:
    fmt = [" | ".join(str(c) for c in header), " | ".join("---" for _ in header)]
    fmt += [" | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in row) for row in rows]
    return "\n".join(f"| {line} |" for line in fmt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="bevfusion-tiny")
    ap.add_argument("--checkpoint", default=None, help="default: random reference-layout weights")
    ap.add_argument("--data-root", default=None, help="default: a generated nuScenes-format tree")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--heldout-batches", type=int, default=2)
    ap.add_argument("--metric", default="decoder_out", choices=["decoder_out", "heatmap", "nds", "map"],
                    help="the sensitivity analysis' metric")
    ap.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                    help="skip nuScenes mAP/NDS of each method (the val split's evaluation)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/sensitivity"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    os.environ.setdefault("BEVFUSION_PTQ_HOME", tempfile.mkdtemp(prefix="ptq-sensitivity-"))
    base = PTQParams(
        config=args.config, checkpoint=args.checkpoint, data_root=args.data_root, device=args.device,
        calib_batches=args.calib_batches, heldout_batches=args.heldout_batches, sensitivity_metric=args.metric,
        fidelity_batches=0, output=str(args.out / "artifacts"),
    )
    report: dict = {"config": args.config, "checkpoint": args.checkpoint or "random", "device": args.device,
                    "calib_batches": args.calib_batches, "heldout_batches": args.heldout_batches,
                    "torch_threads": torch.get_num_threads()}

    ckpt, data = pipeline.prepare_checkpoint(base), pipeline.prepare_dataset(base)
    ref = pipeline.fuse_bn_stage(base, pipeline.insert_quantizers_stage(base, pipeline.load_model_stage(base, ckpt)))
    t = time.perf_counter()
    stats = pipeline.collect_statistics_stage(base, ref, data)
    report["collect_seconds"] = round(time.perf_counter() - t, 2)
    _progress(args.out, report, f"collect-statistics: {report['collect_seconds']} s")
    device = pipeline.resolve_device(args.device)
    heldout = list(heldout_set(base, data).loader(pin_memory=False))

    # 1. every method through compute-amax, judged by the fidelity report on held-out batches
    methods, rows = {}, []
    for method, pct in METHODS:
        params = base.model_copy(update={"calib_method": method, "percentile": pct})
        t = time.perf_counter()
        calibrated = pipeline.compute_amax_stage(params, ref, stats, data)
        seconds = time.perf_counter() - t
        model = load_model(calibrated).to(device).eval()
        fid = fidelity_report(model, heldout, num_batches=len(heldout))
        label = _label(method, pct)
        summary = {s.name: {"cos": s.cosine_mean, "rel_l2": s.rel_l2_mean} for s in fid.stages}
        scores = pipeline.evaluate_stage(params, calibrated, data).summary if args.evaluate else {}
        if scores:
            fp32 = scores["fp32"]
            report["fp32"] = {"mean_ap": fp32["mean_ap"], "nd_score": fp32["nd_score"], "samples": scores["samples"]}
        methods[label] = {"compute_amax_seconds": round(seconds, 3), "stages": summary,
                          "box_agreement": fid.boxes.agreement if fid.boxes else None,
                          "int8": {k: scores["int8"][k] for k in ("mean_ap", "nd_score")} if scores else None}
        rows.append([label, f"{seconds:.2f}",
                     f"{100 * scores['int8']['mean_ap']:.2f}" if scores else "n/a",
                     f"{100 * scores['int8']['nd_score']:.2f}" if scores else "n/a",
                     summary["decoder_out"]["rel_l2"], summary["decoder_out"]["cos"],
                     summary.get("heatmap", {}).get("rel_l2", float("nan")),
                     "n/a" if fid.boxes is None or fid.boxes.agreement is None else f"{fid.boxes.agreement:.1%}"])
    report["methods"] = methods
    t1 = _table(["method", "compute-amax s", "INT8 mAP", "INT8 NDS", "decoder rel. L2", "decoder cos",
                 "heatmap rel. L2", "box agreement"], rows)
    if "fp32" in report:
        t1 += (f"\n\nFP32 on the same {report['fp32']['samples']} val keyframes: mAP {100 * report['fp32']['mean_ap']:.2f}, "
               f"NDS {100 * report['fp32']['nd_score']:.2f}")
    _progress(args.out, report, t1)

    # 2. auto against each single method
    auto_model = load_model(pipeline.compute_amax_stage(base.model_copy(update={"calib_method": "auto"}), ref, stats, data))
    wins: dict[str, int] = {}
    margins: dict[str, list[float]] = {}
    for _, q in auto_model.named_modules():
        choice = getattr(q, "_amax_choice", None)
        if choice:
            wins[choice["winner"]] = wins.get(choice["winner"], 0) + 1
            margins.setdefault(choice["winner"], []).append(choice["margin"])
    auto_err = methods["auto"]["stages"]["decoder_out"]["rel_l2"]
    rows2 = []
    for label, m in methods.items():
        if label == "auto":
            continue
        err = m["stages"]["decoder_out"]["rel_l2"]
        rows2.append([label, wins.get(label, 0), err, auto_err, f"{(err - auto_err) / err:+.1%}" if err else "n/a"])
    report["auto"] = {"wins": wins, "median_margin": {k: sorted(v)[len(v) // 2] for k, v in margins.items()}}
    t2 = _table(["single method", "quantizers auto gave it", "its decoder rel. L2", "auto's", "auto lower by"], rows2)
    _progress(args.out, report, t2)

    # 3. the reference's exclusions vs the proposal at the same target; 4. the ranking
    model = calibrated_model(base, ref, stats, data).to(device).eval()
    held = heldout_set(base, data)
    metric = make_metric(base, data, held, [move_batch(b, device) for b in heldout])
    ref_drop = measure_exclusions(model, metric, DEFAULT_EXCLUDE)
    none_drop = measure_exclusions(model, metric, (), prepared=True)
    _progress(args.out, report, f"drop with no exclusions {none_drop:.4g}, with the reference's two {ref_drop:.4g}")
    params = base.model_copy(update={"sensitivity_target": ref_drop})
    t = time.perf_counter()
    sens = pipeline.sensitivity_stage(params, ref, stats, data)
    report["analysis_seconds"] = round(time.perf_counter() - t, 2)
    result = json.loads(Path(sens.path).read_text())
    proposal = result["proposal"]
    report["exclusions"] = {"metric": result["metric"], "no_exclusions_drop": none_drop, "reference": list(DEFAULT_EXCLUDE),
                            "reference_drop": ref_drop, "proposal": proposal}
    t3 = _table(["exclusions", "groups", "drop"], [
        ["none", 0, none_drop],
        ["reference: " + ", ".join(DEFAULT_EXCLUDE), len(DEFAULT_EXCLUDE), ref_drop],
        ["proposed: " + (", ".join(proposal["groups"]) or "none"), len(proposal["groups"]), proposal["drop"]],
    ])
    top = result["groups"][:10]
    report["top10"] = top
    t4 = _table(["rank", "group", "only this INT8", "all but this INT8", "recovery"],
                [[g["rank"], g["name"], g["only"], g["all_but"], g["recovery"]] for g in top])
    report["evaluations"] = result["evaluations"]

    text = "\n\n".join([
        f"## Methods: fidelity on {len(heldout)} held-out batch(es) ({args.config}, {report['checkpoint']} weights, "
        f"{args.device}); collection took {report['collect_seconds']} s once", t1,
        "## auto against each single method", t2,
        f"## Exclusions at the reference's drop ({result['metric']}, target {ref_drop:.4g})", t3,
        f"## Ten most sensitive groups (analysis: {result['evaluations']} measurements, {report['analysis_seconds']} s)", t4,
    ])
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sensitivity_analysis.json").write_text(json.dumps({**report, "markdown": text}, indent=1) + "\n")
    (args.out / "sensitivity.png").write_bytes(Path(sens.chart).read_bytes())


def _progress(out: Path, report: dict, text: str) -> None:
    """Print a finished table at once and keep the numbers so far (a long run may be cut short)."""
    print(text + "\n", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity_analysis.partial.json").write_text(json.dumps(report, indent=1) + "\n")


def _histogram_amax(model: torch.nn.Module) -> dict[str, float]:
    return {n: float(q._amax) for n, q in model.named_modules()
            if getattr(q, "_amax", None) is not None and q._amax.numel() == 1}


if __name__ == "__main__":
    main()
