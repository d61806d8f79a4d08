"""The sensitivity stage: rank quantizer groups by their measured cost, propose exclusions.

It starts from the collected statistics (amax recomputed in seconds, no collection), so its
key is the statistics' key, the amax method and percentile, the held-out set, the metric and
the target. It writes ``sensitivity.json`` and ``sensitivity.png`` under its work directory
and hands the proposal to compute-amax for ``--exclude auto:<target>``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from bevfusion_ptq.errors import ConfigError
from bevfusion_ptq.evaluation.sensitivity_metric import SCORES
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.amax_stage import calibrated_model
from bevfusion_ptq.pipeline.heldout import heldout_identity, heldout_set
from bevfusion_ptq.pipeline.inputs import config_identity, resolve_device
from bevfusion_ptq.pipeline.keys import stage_key
from bevfusion_ptq.pipeline.refs import DatasetRef, SensitivityRef, StageRef
from bevfusion_ptq.quant.calibrate import ProgressFn
from bevfusion_ptq.quant.insert import matches
from bevfusion_ptq.quant.rules import bevfusion_rules
from bevfusion_ptq.quant.sensitivity import FidelityMetric, Metric, analyse_sensitivity, quantizer_groups
from bevfusion_ptq.quant.sensitivity_chart import markdown_image, sensitivity_png
from bevfusion_ptq.workdir import stage_dir

log = logging.getLogger(__name__)

STAGE = "sensitivity"
RESULT_FILE = "sensitivity.json"
CHART_FILE = "sensitivity.png"


def sensitivity_target(params: PTQParams) -> float | None:
    """The drop the proposal must reach: ``--exclude auto:<target>``'s, else ``--sensitivity-target``."""
    auto = params.auto_exclude_target
    return auto if auto is not None else params.sensitivity_target


def sensitivity_key(params: PTQParams, ref: StageRef, stats: StageRef, data: DatasetRef) -> str:
    return stage_key(
        STAGE, sensitivity_stage, params, model=ref.key, statistics=stats.key,
        heldout=heldout_identity(params, data), target=sensitivity_target(params),
    )


def make_metric(params: PTQParams, data: DatasetRef, heldout: Any, batches: list) -> Metric:
    """The metric the analysis measures on the held-out ``batches`` (val keyframes).

    ``nds`` / ``map``: the nuScenes score's drop against FP32, scored by nuscenes-devkit on
    those keyframes (the data's tables must hold the val split). Otherwise the fidelity
    report's relative error of ``decoder_out`` or ``heatmap``.
    """
    if params.sensitivity_metric not in SCORES:
        return FidelityMetric(batches, stage=params.sensitivity_metric)
    from bevfusion_ptq.evaluation.database import open_eval_split
    from bevfusion_ptq.evaluation.predict import class_names_of, record_poses
    from bevfusion_ptq.evaluation.sensitivity_metric import DetectionScoreMetric

    opened = open_eval_split(data.data_root, params.eval_version, params.eval_split)
    cfg, _ = config_identity(params)
    return DetectionScoreMetric(
        params.sensitivity_metric, batches, nusc=opened.nusc, split=opened.split, split_tokens=opened.tokens,
        poses=record_poses(heldout.records), class_names=class_names_of(cfg),
    )


def sensitivity_stage(
    params: PTQParams, ref: StageRef, stats: StageRef, data: DatasetRef, *, progress: ProgressFn | None = None
) -> SensitivityRef:
    """Analyse every group on ``heldout_batches`` val samples; propose for the run's target."""
    from bevfusion_ptq.data.batch import move_batch

    key = sensitivity_key(params, ref, stats, data)
    device = resolve_device(params.device)
    model = calibrated_model(params, ref, stats, data).to(device).eval()
    heldout = heldout_set(params, data)
    batches = [move_batch(b, device) for b in heldout.loader(pin_memory=False)]
    groups = quantizer_groups(model, bevfusion_rules().share)
    if params.sensitivity_groups:
        patterns = tuple(params.sensitivity_groups)
        groups_all, groups = groups, [g for g in groups if g.name in patterns or any(matches(m, patterns) for m in g.modules)]
        if not groups:
            raise ConfigError(f"--sensitivity-groups {' '.join(patterns)} matches no quantizer group")
        analysed = {p for g in groups for p in g.quantizers}
        always_on = [p for g in groups_all for p in g.quantizers if p not in analysed]
    else:
        always_on = []
    target = sensitivity_target(params)
    log.info("sensitivity analysis: %d groups on %d held-out batches on %s", len(groups), len(batches), device)
    result = analyse_sensitivity(
        model, groups, make_metric(params, data, heldout, batches), target=target, progress=progress, always_on=always_on
    )
    folder = stage_dir(STAGE, key)
    folder.mkdir(parents=True, exist_ok=True)
    path, chart = folder / RESULT_FILE, folder / CHART_FILE
    body = {**result.as_dict(), "method": params.calib_method, "device": str(device)}
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(body, indent=1, allow_nan=False) + "\n")
    png = sensitivity_png(result)
    chart.write_bytes(png)
    tmp.replace(path)
    proposal = result.proposal
    return SensitivityRef(
        key=key,
        path=str(path),
        chart=str(chart),
        target=target,
        exclude_quantizers=list(proposal.quantizers) if proposal else [],
        exclude_groups=list(proposal.groups) if proposal else [],
        markdown=result.markdown() + "\n" + markdown_image(png) + "\n",
    )
