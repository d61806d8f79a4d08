"""The save stage: the versioned directory with the model, its tables, plots and manifest."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from bevfusion_ptq.artifacts import MANIFEST, SavedVersion, save_artifacts
from bevfusion_ptq.evaluation.gate import GateVerdict
from bevfusion_ptq.hashing import data_sha256
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.inputs import config_identity
from bevfusion_ptq.pipeline.keys import stage_key
from bevfusion_ptq.pipeline.export_stage import copy_export
from bevfusion_ptq.pipeline.gate_stage import evaluation_manifest, gate_thresholds, write_evaluation
from bevfusion_ptq.pipeline.refs import CheckpointRef, DatasetRef, EvaluationRef, ExportRef, FidelityRef, StageRef
from bevfusion_ptq.provenance import code_version
from bevfusion_ptq.quant.plots import plot_histograms
from bevfusion_ptq.quant.report import quantizer_status
from bevfusion_ptq.quant.rules import bevfusion_rules
from bevfusion_ptq.workdir import load_model, state_dir


def version_id(
    params: PTQParams,
    ckpt: CheckpointRef,
    data: DatasetRef,
    calibrated: StageRef,
    fidelity: FidelityRef,
    evaluation: EvaluationRef | None = None,
    exported: ExportRef | None = None,
) -> str:
    """Deterministic version: same inputs and code, same version (its stage keys carry both).

    With an evaluation, its key and the gate's thresholds are inputs too: the version holds
    ``evaluation.json`` with the verdict, and a version judged under other thresholds is
    another record (so a version held back by a strict gate never shares its id with a
    published one).
    """
    made_from = {
        "checkpoint": ckpt.sha256,
        "config": config_identity(params)[1],
        "data": data.fingerprint,
        "calibration": calibrated.key,
        "fidelity": fidelity.key,
    }
    if evaluation is not None:
        made_from["evaluation"] = evaluation.key
        made_from["gate"] = asdict(gate_thresholds(params))
    if exported is not None and exported.path is not None:
        made_from["export"] = exported.key  # another --export set is another version
    return data_sha256(made_from)[:16]


def local_root(params: PTQParams, held: bool = False) -> Path:
    """Where the version is written: the output itself, or an outbox for an s3:// output
    (kept after publishing, so a failed upload can be retried with ``bevfusion-ptq publish``)
    and for a version the gate ``held`` back (never inside a local output's published tree)."""
    return state_dir() / "outbox" if params.publishes_to_s3 or held else Path(params.output)


def _held(verdict: GateVerdict | None) -> bool:
    return verdict is not None and verdict.failed


def save_artifacts_key(
    params: PTQParams,
    calibrated: StageRef,
    ckpt: CheckpointRef,
    data: DatasetRef,
    fidelity: FidelityRef,
    evaluation: EvaluationRef | None = None,
    verdict: GateVerdict | None = None,
    exported: ExportRef | None = None,
) -> str:
    return stage_key(
        "save_artifacts", save_artifacts_stage, params,
        version=version_id(params, ckpt, data, calibrated, fidelity, evaluation, exported),
        root=str(local_root(params, _held(verdict)).resolve()),
    )


def version_dir(
    params: PTQParams,
    calibrated: StageRef,
    ckpt: CheckpointRef,
    data: DatasetRef,
    fidelity: FidelityRef,
    evaluation: EvaluationRef | None = None,
    verdict: GateVerdict | None = None,
    exported: ExportRef | None = None,
) -> Path:
    return (
        local_root(params, _held(verdict)) / params.model_name
        / version_id(params, ckpt, data, calibrated, fidelity, evaluation, exported)
    )


def _method_cell(row: dict) -> str:
    """The method, and for auto by how much the winner beat the runner-up and mse."""
    auto = row.get("auto")
    if not auto:
        return row["method"]
    return f"{row['method']} ({auto['margin']:.1%} below next, {auto['vs_mse']:.1%} below mse)"


def _status_markdown(rows: list[dict]) -> str:
    lines = ["| quantizer | group | on | bits | axis | calibrator | method | amax |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        amax = "-" if r["amax_max"] is None else (
            f"{r['amax']:.4g}" if r["axis"] is None else f"{r['amax_min']:.3g} / {r['amax_median']:.3g} / {r['amax_max']:.3g}"
        )
        lines.append(
            f"| {r['name']} | {r['share_group'] or ''} | {'yes' if r['enabled'] else 'no'} | {r['num_bits']} | "
            f"{'tensor' if r['axis'] is None else r['axis']} | {r['calibrator']} | {_method_cell(r)} | {amax} |"
        )
    return "\n".join(lines) + "\n"


def save_artifacts_stage(
    params: PTQParams,
    calibrated: StageRef,
    ckpt: CheckpointRef,
    data: DatasetRef,
    fidelity: FidelityRef,
    flow_run_id: str | None = None,
    evaluation: EvaluationRef | None = None,
    verdict: GateVerdict | None = None,
    exported: ExportRef | None = None,
) -> SavedVersion:
    """Write ``<root>/<model>/<version>/``: model, status table, fidelity, evaluation, plots,
    config, the deployment ONNX set when ``exported`` holds one, and the manifest. A version
    the gate failed goes to the outbox (see :func:`local_root`)."""
    cfg, cfg_hash = config_identity(params)
    model = load_model(calibrated)
    status = [row.as_dict() for row in quantizer_status(model, params.calib_method, bevfusion_rules().share)]

    def write_extra(folder: Path) -> None:
        (folder / "status.md").write_text(_status_markdown(status))
        if fidelity.path:
            report = json.loads(Path(fidelity.path).read_text())
            report.pop("seconds", None)  # a wall time: published files depend on the inputs only
            (folder / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_histograms(model, folder / "plots", method=params.calib_method)
        copy_export(exported, folder)
        if evaluation is not None:
            write_evaluation(folder, evaluation, verdict)

    return save_artifacts(
        model,
        status,
        local_root(params, _held(verdict)),
        model_name=params.model_name,
        version=version_id(params, ckpt, data, calibrated, fidelity, evaluation, exported),
        inputs={
            "checkpoint": ckpt.source,
            "checkpoint_sha256": ckpt.sha256,
            "checkpoint_generated": ckpt.generated,
            "config": params.config,
            "config_sha256": cfg_hash,
            "dataset_fingerprint": data.fingerprint,
            "dataset_generated": data.generated,
            "calibration": {
                "method": params.calib_method,
                "sampling": params.calib_sampling,
                "pipeline": params.calib_pipeline,
                "percentile": params.percentile,
                "batches": len(data.tokens),
                "exclude": params.exclude,
                "seed": params.seed,
            },
            "stage_keys": {
                "collect_statistics": calibrated.made_from.get("statistics"), "compute_amax": calibrated.key,
                "fidelity": fidelity.key,
            }
            | ({"export": exported.key} if exported is not None else {})
            | ({"evaluate": evaluation.key} if evaluation is not None else {}),
        },
        extra_files={"config.json": cfg.to_dict()},
        write_extra=write_extra,
        manifest_extra={
            **code_version(), "flow_run_id": flow_run_id, "fidelity": fidelity.summary,
            **({"export": exported.files} if exported is not None and exported.path else {}),
            **(evaluation_manifest(evaluation, verdict) if evaluation is not None else {}),
        },
    )


def saved_version_exists(path: Path) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        json.loads(manifest.read_text())
    except ValueError:
        return False
    return True
