"""ONNX Runtime latency of the deployment graphs, INT8 (Q/DQ) against FP32, at bevfusion-r50 shapes.

    python bench/export_runtime.py --out DIR              # bevfusion-r50 (default), CPU
    python bench/export_runtime.py --config bevfusion-tiny --out DIR

One process: build the model with random weights, insert quantizers, fold BN, calibrate with the
max calibrator on ``--calib-batches`` synthetic batches (structure only: the numbers of a random
model say nothing about accuracy), then export the INT8 set and the FP16 set (= every quantizer
off; the files are float32, so ONNX Runtime runs that set in FP32). For each dense graph both
sessions run side by side (alternating, after warm-up) on the same inputs; the median over
``--repeats`` is reported with the ratio INT8/FP32.

Which nodes ran INT8: each INT8 session writes its optimized graph
(``SessionOptions.optimized_model_filepath``); the INT8 kernels there (QLinearConv,
QLinearMatMul, ConvInteger, MatMulInteger, ...) are counted against the convolutions left in
float (Conv fed by DequantizeLinear). A Q/DQ placement that ONNX Runtime cannot fuse shows up
as few INT8 kernels and no speed-up.

Also prints, per exported file, its size, node count and Q/DQ pairs (the r50 export check), and
writes everything to ``DIR/export_runtime.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bevfusion_ptq.data.batch import random_batch  # noqa: E402
from bevfusion_ptq.export import set_dir  # noqa: E402
from bevfusion_ptq.export.deployment import (  # noqa: E402
    BACKBONE, FUSER, HEAD, VTRANSFORM, export_set, sample_inputs, write_deploy_md,
)
from bevfusion_ptq.model.builder import build_model  # noqa: E402
from bevfusion_ptq.model.config import load_config  # noqa: E402
from bevfusion_ptq.quant.calibrate import calibrate  # noqa: E402
from bevfusion_ptq.quant.fold_relu import fold_relu  # noqa: E402
from bevfusion_ptq.quant.fuse import fuse_bn  # noqa: E402
from bevfusion_ptq.quant.insert import apply_exclusions, insert_quantizers  # noqa: E402
from bevfusion_ptq.quant.rules import DEFAULT_EXCLUDE, bevfusion_rules  # noqa: E402

INT8_KERNELS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearConcat",
                "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool", "QLinearGlobalAveragePool",
                "DynamicQuantizeLinear", "QGemm", "QAttention"}


def calibrated_model(config: str, batches: int, points: int):
    cfg = load_config(config)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    insert_quantizers(model, bevfusion_rules())
    fuse_bn(model)
    data = [random_batch(cfg, num_points=points, seed=i) for i in range(batches)]
    calibrate(model, data, method="max", num_batches=batches)
    apply_exclusions(model, DEFAULT_EXCLUDE)
    fold_relu(model)
    return cfg, model, data


def session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def int8_placement(optimized: Path) -> dict:
    graph = onnx.load(str(optimized), load_external_data=False)
    ops = collections.Counter(n.op_type for n in graph.graph.node)
    producers = {o: n.op_type for n in graph.graph.node for o in n.output}
    float_convs = sum(1 for n in graph.graph.node if n.op_type in ("Conv", "ConvTranspose", "FusedConv")
                      and producers.get(n.input[0]) == "DequantizeLinear")
    int8 = {k: v for k, v in ops.items() if k in INT8_KERNELS}
    return {"int8_kernels": int8, "float_convs_after_dq": float_convs,
            "remaining_qdq": ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0),
            "op_counts": dict(ops.most_common())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="bevfusion-r50")
    parser.add_argument("--out", type=Path, default=Path("bench-export-runtime"))
    parser.add_argument("--calib-batches", type=int, default=2)
    parser.add_argument("--points", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    cfg, model, data = calibrated_model(args.config, args.calib_batches, args.points)
    t_calib = time.perf_counter() - t0
    inputs = sample_inputs(model, data[0])
    t0 = time.perf_counter()
    files = []
    for precision in ("int8", "fp16"):
        files += export_set(model, inputs, args.out / set_dir(precision), precision)
    write_deploy_md(args.out / "deploy.md", files, model_name=args.config)
    t_export = time.perf_counter() - t0
    print(f"\n{args.config}: calibrated in {t_calib:.0f} s, both sets exported in {t_export:.0f} s\n")
    print(f"{'file':34} {'set':5} {'MB':>8} {'nodes':>6} {'Q/DQ pairs':>10} {'scales':>6}")
    for f in files:
        print(f"{f.name:34} {f.precision:5} {f.size / 1e6:8.2f} {f.nodes:6d} {min(f.quantize, f.dequantize):10d} {f.distinct_scales:6d}")

    feeds = {
        BACKBONE: {"img": inputs.img, "depth": inputs.depth},
        VTRANSFORM: {"feat_in": inputs.feat_in},
        FUSER: {"camera": inputs.camera_bev, "lidar": inputs.lidar_bev},
        HEAD: {"middle": inputs.middle},
    }
    rows = []
    print(f"\nONNX Runtime {ort.__version__}, CPU, {args.threads} threads, median of {args.repeats}")
    print(f"{'graph':24} {'INT8 ms':>9} {'FP32 ms':>9} {'INT8/FP32':>9}  INT8 kernels (optimized graph)")
    for name, feed in feeds.items():
        arrays = {k: v.detach().float().contiguous().numpy() for k, v in feed.items()}
        optimized = args.out / f"optimized.{name}"
        s8 = session(args.out / set_dir("int8") / name, args.threads, optimized)
        s32 = session(args.out / set_dir("fp16") / name, args.threads)
        for _ in range(args.warmup):
            s8.run(None, arrays)
            s32.run(None, arrays)
        t8, t32 = [], []
        for _ in range(args.repeats):
            for sess, times in ((s8, t8), (s32, t32)):
                start = time.perf_counter()
                sess.run(None, arrays)
                times.append((time.perf_counter() - start) * 1e3)
        placement = int8_placement(optimized)
        row = {"graph": name, "int8_ms": statistics.median(t8), "fp32_ms": statistics.median(t32),
               "int8_runs_ms": t8, "fp32_runs_ms": t32, **placement}
        row["ratio"] = row["int8_ms"] / row["fp32_ms"]
        rows.append(row)
        kernels = ", ".join(f"{k} {v}" for k, v in placement["int8_kernels"].items()) or "none"
        print(f"{name:24} {row['int8_ms']:9.1f} {row['fp32_ms']:9.1f} {row['ratio']:9.2f}  {kernels}; "
              f"float convs after DQ: {placement['float_convs_after_dq']}")
    result = {
        "config": args.config, "threads": args.threads, "onnxruntime": ort.__version__, "torch": torch.__version__,
        "calibrate_s": t_calib, "export_s": t_export, "files": [f.as_dict() for f in files], "latency": rows,
    }
    (args.out / "export_runtime.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"\nwrote {args.out / 'export_runtime.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
