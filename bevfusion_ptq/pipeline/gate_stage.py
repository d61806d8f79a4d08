"""The gate step and what a version records of its evaluation.

:func:`gate_stage` judges a run from its evaluation and fidelity summaries and the run's
thresholds (pure and cheap, so it is never cached: changing a threshold re-judges without
re-evaluating). The version then carries the evaluation and the verdict:

- ``evaluation.json``: the evaluate stage's report (dataset, devkit version, FP32 and INT8
  metrics, the FP32 | INT8 | delta rows, box counts, timings) plus ``gate``: status, the
  one-line reason, the thresholds and every check with its measurement, limit and by how
  much it failed;
- ``evaluation/results_{fp32,int8}.json``: the nuScenes submissions that were scored;
- ``evaluation/{fp32,int8}/plots/*.png``: the devkit's PR and TP curves;
- in ``manifest.json``: ``evaluation`` (headline numbers) and ``gate`` (status, reason,
  thresholds), so ``bevfusion-ptq list`` and consumers see them without opening files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bevfusion_ptq.evaluation.gate import GateThresholds, GateVerdict, gate_verdict
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.evaluate_stage import EVALUATION_FILE
from bevfusion_ptq.pipeline.refs import EvaluationRef, FidelityRef

#: Sub-folder of a version that holds the submissions and plots.
EVALUATION_DIR = "evaluation"


def gate_thresholds(params: PTQParams) -> GateThresholds:
    return GateThresholds(params.max_map_drop, params.max_nds_drop, params.min_fidelity_cosine)


def gate_stage(params: PTQParams, evaluation: EvaluationRef, fidelity: FidelityRef) -> GateVerdict:
    """The verdict on this run (see :func:`bevfusion_ptq.evaluation.gate.gate_verdict`)."""
    return gate_verdict(
        evaluation.summary.get("fp32"), evaluation.summary.get("int8"), fidelity.summary, gate_thresholds(params)
    )


def write_evaluation(folder: Path, evaluation: EvaluationRef, verdict: GateVerdict | None) -> None:
    """Put the evaluation report (with the verdict), submissions and plots into a version folder."""
    gate = verdict.as_dict() if verdict is not None else None
    if evaluation.path is None:
        report: dict[str, Any] = {"evaluated": False, "reason": "evaluation switched off (--eval-samples 0)"}
    else:
        source = Path(evaluation.path)
        report = {"evaluated": True, **json.loads((source / EVALUATION_FILE).read_text())}
        target = folder / EVALUATION_DIR
        for mode, entry in report["results_files"].items():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / entry["name"], target / entry["name"])
            entry["name"] = f"{EVALUATION_DIR}/{entry['name']}"
            plots = []
            for rel in report["plots"][mode]:
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / rel, dest)
                plots.append(f"{EVALUATION_DIR}/{rel}")
            report["plots"][mode] = plots
    report["gate"] = gate
    (folder / EVALUATION_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n")


def evaluation_manifest(evaluation: EvaluationRef, verdict: GateVerdict | None) -> dict[str, Any]:
    """The manifest's ``evaluation`` and ``gate`` entries."""
    s = evaluation.summary
    headline = (
        {"evaluated": False}
        if not s
        else {
            "evaluated": True, "samples": s["samples"], "version": s["version"], "split": s["split"],
            **{f"{mode}_{name}": round(float(s[mode][key]), 6)
               for mode in ("fp32", "int8") for name, key in (("map", "mean_ap"), ("nds", "nd_score"))},
        }
    )  # fmt: skip
    gate = (
        {"status": "skipped", "reason": "no gate"}
        if verdict is None
        else {"status": verdict.status, "reason": verdict.reason, "thresholds": verdict.as_dict()["thresholds"]}
    )
    return {"evaluation": headline, "gate": gate}
