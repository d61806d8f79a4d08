"""The evaluate stage: nuScenes mAP/NDS of the calibrated model, FP32 and INT8, on the val split.

Which keyframes: the val info file (``<data root>/nuscenes_infos_val.pkl``), all of them on a
generated tree; on a user's tree ``--eval-samples`` of them (default
:data:`USER_TREE_DEFAULT_SAMPLES`), spread evenly over the scenes with the calibration
set's sampler, so a bounded evaluation still sees every part of the split. Ground truth
comes from the nuScenes tables of the same root (the devkit's ``NuScenes``), restricted to
the evaluated keyframes when they are not the whole split
(:mod:`bevfusion_ptq.evaluation.metrics`).

Cache key: the calibrated model's key, the evaluation options and the identity of the
evaluation data (the generated tree's name, or the stamps of the val info file and the
tables). The gate thresholds are not in it: changing them re-judges, it does not re-run.

Output (``<state>/work/evaluate/<key>/``): ``results_fp32.json`` and ``results_int8.json``
(the nuScenes submissions), ``fp32/plots/*.png`` and ``int8/plots/*.png`` (the devkit's PR
and TP curves) and ``evaluation.json``, written last.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from bevfusion_ptq.hashing import file_sha256
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.inputs import _file_stamp, config_identity, resolve_device
from bevfusion_ptq.pipeline.keys import stage_key
from bevfusion_ptq.pipeline.refs import DatasetRef, EvaluationRef, StageRef
from bevfusion_ptq.workdir import load_model, stage_dir

log = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"
VAL_INFO_NAME = "nuscenes_infos_val.pkl"
#: Keyframes evaluated on a user's tree unless --eval-samples says otherwise (of 6019 in val).
USER_TREE_DEFAULT_SAMPLES = 500
_TABLE_STAMPS = ("sample.json", "sample_annotation.json", "scene.json")


def _data_identity(data: DatasetRef) -> dict[str, Any]:
    """What the evaluation reads, without reading it: the generated tree's name, or stamps."""
    root = Path(data.data_root)
    if data.generated:
        return {"generated": root.name}
    info = root / VAL_INFO_NAME
    tables = {
        f"{folder.name}/{name}": _file_stamp(folder / name)
        for folder in sorted(root.glob("v1.0-*"))
        for name in _TABLE_STAMPS
        if (folder / name).is_file()
    }
    return {"root": str(root.resolve()), "info": _file_stamp(info) if info.is_file() else None, "tables": tables}


def evaluate_key(params: PTQParams, ref: StageRef, data: DatasetRef) -> str:
    return stage_key("evaluate", evaluate_stage, params, model=ref.key, data=_data_identity(data))


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("mean_ap", "nd_score", "tp_errors", "mean_dist_aps")}


def evaluate_stage(
    params: PTQParams, ref: StageRef, data: DatasetRef, *, progress: Any = None
) -> EvaluationRef:
    """Evaluate the calibrated model ``ref`` FP32 and INT8 on the val split of ``data``'s root."""
    from bevfusion_ptq.data import build_calibration_set, read_info_file
    from bevfusion_ptq.evaluation.database import open_eval_split
    from bevfusion_ptq.evaluation.metrics import CONFIG_NAME, evaluate_detections
    from bevfusion_ptq.evaluation.predict import PRECISIONS, class_names_of, predict, record_poses
    from bevfusion_ptq.evaluation.report import comparison_rows, json_safe
    from bevfusion_ptq.evaluation.results import results_document

    key = evaluate_key(params, ref, data)
    if params.eval_samples == 0:
        log.info("evaluation switched off (--eval-samples 0)")
        return EvaluationRef(key=key, path=None, summary={})
    started = time.perf_counter()
    root = Path(data.data_root)

    # Everything that can be wrong with the data fails here, before the model is loaded.
    opened = open_eval_split(root, params.eval_version, params.eval_split)
    nusc, version, split, split_tokens = opened.nusc, opened.version, opened.split, opened.tokens
    info_path = root / VAL_INFO_NAME
    available = len(read_info_file(info_path))
    wanted = params.eval_samples or (available if data.generated else USER_TREE_DEFAULT_SAMPLES)
    count = min(wanted, available)
    if count < wanted:
        log.warning("evaluating %d keyframes: %s has only %d", count, info_path, available)
    cfg, _ = config_identity(params)
    eval_set = build_calibration_set(
        root, info_path, cfg.data, count, sampling="spread", pipeline="test", seed=params.seed
    )
    class_names = class_names_of(cfg)
    tokens = eval_set.tokens
    log.info("evaluating on %d of %d %s keyframes of %s (%s)", count, len(split_tokens), split, version, root)

    device = resolve_device(params.device)
    model = load_model(ref).to(device).eval()
    try:
        poses = record_poses(eval_set.records)
        loader = eval_set.loader(pin_memory=device.type == "cuda")
        predictions = predict(model, loader, poses, class_names, total=count, progress=progress)
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    folder = stage_dir("evaluate", key)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EVALUATION_FILE).unlink(missing_ok=True)
    metrics: dict[str, dict[str, Any]] = {}
    counts: dict[str, dict[str, int]] = {}
    files: dict[str, dict[str, str]] = {}
    plots: dict[str, list[str]] = {}
    seconds: dict[str, float] = {"predict": round(predictions.seconds, 3)}
    for mode in PRECISIONS:
        path = folder / f"results_{mode}.json"
        path.write_text(json.dumps(results_document(predictions.results[mode])))
        files[mode] = {"name": path.name, "sha256": file_sha256(path)}
        result = evaluate_detections(nusc, path, split, tokens, folder / mode, split_tokens=split_tokens)
        metrics[mode] = json_safe(result.summary)
        counts[mode] = {
            "gt_boxes": result.gt_boxes, "pred_boxes": result.pred_boxes, "gt_per_class": result.gt_per_class,
        }
        plots[mode] = [Path(p).relative_to(folder).as_posix() for p in result.plots]
        seconds[f"metrics_{mode}"] = round(result.seconds, 3)
    seconds["total"] = round(time.perf_counter() - started, 3)

    from importlib.metadata import version as package_version

    report = {
        "dataset": {
            "data_root": str(root), "generated": data.generated, "version": version, "split": split,
            "info_path": str(info_path), "info_sha256": eval_set.info_sha256, "samples": count,
            "split_samples": len(split_tokens), "whole_split": set(tokens) == set(split_tokens), "tokens": tokens,
        },
        "devkit": {"package": "nuscenes-devkit", "version": package_version("nuscenes-devkit"), "config": CONFIG_NAME},
        "device": str(device),
        "metrics": metrics,
        "comparison": comparison_rows(metrics["fp32"], metrics["int8"]),
        "boxes_after_filters": counts,
        "nonfinite_boxes": predictions.nonfinite_boxes,
        "results_files": files,
        "plots": plots,
        "seconds": seconds,
    }  # fmt: skip
    tmp = folder / f".{EVALUATION_FILE}.partial"
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n")
    tmp.replace(folder / EVALUATION_FILE)
    summary = {"samples": count, "version": version, "split": split, "seconds": seconds["total"],
               **{mode: _summary(metrics[mode]) for mode in PRECISIONS}}  # fmt: skip
    log.info(
        "evaluation done in %.1f s: FP32 mAP %.4f NDS %.4f, INT8 mAP %.4f NDS %.4f",
        seconds["total"], metrics["fp32"]["mean_ap"], metrics["fp32"]["nd_score"],
        metrics["int8"]["mean_ap"], metrics["int8"]["nd_score"],
    )  # fmt: skip
    return EvaluationRef(key=key, path=str(folder), summary=summary)


def evaluation_present(params: PTQParams, ref: StageRef, data: DatasetRef) -> bool:
    """A cached evaluation is usable while its ``evaluation.json`` is on disk (or it was off)."""
    folder = stage_dir("evaluate", evaluate_key(params, ref, data))
    return params.eval_samples == 0 or (folder / EVALUATION_FILE).is_file()
