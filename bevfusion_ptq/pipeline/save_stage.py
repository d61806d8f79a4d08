"""The save stage: the versioned directory with the model, its tables, plots and manifest."""

from __future__ import annotations

import json
from pathlib import Path

from bevfusion_ptq.artifacts import MANIFEST, SavedVersion, save_artifacts
from bevfusion_ptq.hashing import data_sha256
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.inputs import config_identity
from bevfusion_ptq.pipeline.keys import stage_key
from bevfusion_ptq.pipeline.refs import CheckpointRef, DatasetRef, FidelityRef, StageRef
from bevfusion_ptq.provenance import code_version
from bevfusion_ptq.quant.plots import plot_histograms
from bevfusion_ptq.quant.report import quantizer_status
from bevfusion_ptq.quant.rules import bevfusion_rules
from bevfusion_ptq.workdir import load_model, state_dir


def version_id(params: PTQParams, ckpt: CheckpointRef, data: DatasetRef, calibrated: StageRef, fidelity: FidelityRef) -> str:
    """Deterministic version: same inputs and code, same version (its stage keys carry both)."""
    return data_sha256(
        {
            "checkpoint": ckpt.sha256,
            "config": config_identity(params)[1],
            "data": data.fingerprint,
            "calibration": calibrated.key,
            "fidelity": fidelity.key,
        }
    )[:16]


def local_root(params: PTQParams) -> Path:
    """Where the version is written: the output itself, or an outbox for an s3:// output
    (kept after publishing, so a failed upload can be retried with ``bevfusion-ptq publish``)."""
    return state_dir() / "outbox" if params.publishes_to_s3 else Path(params.output)


def save_artifacts_key(
    params: PTQParams, calibrated: StageRef, ckpt: CheckpointRef, data: DatasetRef, fidelity: FidelityRef
) -> str:
    return stage_key(
        "save_artifacts", save_artifacts_stage, params,
        version=version_id(params, ckpt, data, calibrated, fidelity), root=str(local_root(params).resolve()),
    )


def version_dir(
    params: PTQParams, calibrated: StageRef, ckpt: CheckpointRef, data: DatasetRef, fidelity: FidelityRef
) -> Path:
    return local_root(params) / params.model_name / version_id(params, ckpt, data, calibrated, fidelity)


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
) -> SavedVersion:
    """Write ``<root>/<model>/<version>/``: model, status table, fidelity, plots, config, manifest."""
    cfg, cfg_hash = config_identity(params)
    model = load_model(calibrated)
    status = [row.as_dict() for row in quantizer_status(model, params.calib_method, bevfusion_rules().share)]

    def write_extra(folder: Path) -> None:
        (folder / "status.md").write_text(_status_markdown(status))
        if fidelity.path:
            (folder / "fidelity.json").write_text(Path(fidelity.path).read_text())
        plot_histograms(model, folder / "plots", method=params.calib_method)

    return save_artifacts(
        model,
        status,
        local_root(params),
        model_name=params.model_name,
        version=version_id(params, ckpt, data, calibrated, fidelity),
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
                "batches": params.calib_batches,
                "exclude": params.exclude,
                "seed": params.seed,
            },
            "stage_keys": {
                "collect_statistics": calibrated.made_from.get("statistics"), "compute_amax": calibrated.key,
                "fidelity": fidelity.key,
            },
        },
        extra_files={"config.json": cfg.to_dict()},
        write_extra=write_extra,
        manifest_extra={**code_version(), "flow_run_id": flow_run_id, "fidelity": fidelity.summary},
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
