"""The gate task: judge the run, and show the evaluation in the UI.

Runs on every flow run, cached stages or not (it is cheap), so a re-run with other
thresholds is judged again without evaluating again. Artifacts:

- ``evaluation-fp32-int8``: a table, FP32 | INT8 | delta per metric (mAP, NDS, the five TP
  errors) and per class AP, described with the gate's verdict;
- ``evaluation-plots``: a markdown page with the devkit's plots of both passes embedded as
  images (data URIs: the browser does not load ``file://`` images).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from bevfusion_ptq import pipeline
from bevfusion_ptq.evaluation.gate import GateVerdict
from bevfusion_ptq.evaluation.report import plots_markdown
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.evaluate_stage import EVALUATION_FILE


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@task(name="gate", cache_policy=NO_CACHE)
def gate(params: PTQParams, evaluation: pipeline.EvaluationRef, fidelity: pipeline.FidelityRef) -> GateVerdict:
    logger = get_run_logger()
    verdict = pipeline.gate_stage(params, evaluation, fidelity)
    s = evaluation.summary
    if s:
        for mode in ("fp32", "int8"):
            logger.info("%s: mAP %.4f, NDS %.4f (%d %s keyframes of %s)", mode.upper(), s[mode]["mean_ap"],
                        s[mode]["nd_score"], s["samples"], s["split"], s["version"])  # fmt: skip
    (logger.error if verdict.failed else logger.info)("gate %s: %s", verdict.status, verdict.reason)
    if evaluation.path is not None:
        folder = Path(evaluation.path)
        report = json.loads((folder / EVALUATION_FILE).read_text())
        create_table_artifact(
            table=[{k: (r[k] if k == "metric" else _fmt(r[k])) for k in ("metric", "fp32", "int8", "delta")}
                   for r in report["comparison"]],
            key="evaluation-fp32-int8",
            description=f"nuScenes {s['split']} ({s['samples']} keyframes): FP32 | INT8 | delta (INT8 - FP32). "
                        f"Gate {verdict.status}: {verdict.reason}",
        )  # fmt: skip
        plots = {mode: [folder / p for p in paths] for mode, paths in report["plots"].items()}
        create_markdown_artifact(
            plots_markdown(plots, f"nuScenes {s['split']}: the devkit's PR and TP curves"),
            key="evaluation-plots", description="nuscenes-devkit plots of the FP32 and INT8 passes",
        )
    return verdict
