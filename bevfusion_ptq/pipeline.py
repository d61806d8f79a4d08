"""The PTQ job as plain library calls, one function per stage.

Each stage takes and returns small descriptors, so an orchestrator (``tasks/`` and
``flows/``) can run them as separate steps, and a plain script can chain them directly::

    ckpt = prepare_checkpoint(params)
    data = prepare_dataset(params)
    ref = load_model_stage(params, ckpt)
    ref = insert_quantizers_stage(params, ref)
    ref = fuse_bn_stage(ref)
    ref = calibrate_stage(params, ref, data)
    saved = save_artifacts_stage(params, ref, ckpt, data)
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from bevfusion_ptq import __version__
from bevfusion_ptq.artifacts import SavedVersion, save_artifacts
from bevfusion_ptq.errors import CheckpointError, ConfigError
from bevfusion_ptq.hashing import data_sha256, file_sha256
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.quant.calibrate import ProgressFn, calibrate
from bevfusion_ptq.quant.fuse import fuse_bn
from bevfusion_ptq.quant.insert import apply_exclusions, insert_quantizers
from bevfusion_ptq.quant.report import quantizer_status
from bevfusion_ptq.quant.rules import bevfusion_rules
from bevfusion_ptq.workdir import StageRef, load_model, save_model, stage_key, state_dir

log = logging.getLogger(__name__)


class CheckpointRef(BaseModel):
    path: str
    sha256: str
    generated: bool


class DatasetRef(BaseModel):
    """Which calibration samples, identified by a fingerprint of the data and the choice."""

    data_root: str
    info_path: str
    tokens: list[str]
    fingerprint: str
    generated: bool


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when present; asking for CUDA without it is a config error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch sees no CUDA device")
    return torch.device(device)


def config_identity(params: PTQParams) -> tuple[Any, str]:
    """The resolved config and its hash (what the model and data stages depend on)."""
    from bevfusion_ptq.model.config import load_config

    cfg = load_config(params.config)
    return cfg, data_sha256(cfg.to_dict())


def prepare_checkpoint(params: PTQParams) -> CheckpointRef:
    """The user's checkpoint, hashed; or a random reference-layout one made once per config+seed."""
    from bevfusion_ptq.model.checkpoint import make_checkpoint

    if params.checkpoint:
        path = Path(params.checkpoint)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        return CheckpointRef(path=str(path.resolve()), sha256=file_sha256(path), generated=False)
    cfg, _ = config_identity(params)
    path = state_dir() / "checkpoints" / f"{Path(params.config).stem}-random-seed{params.seed}.pth"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("no --checkpoint given: writing a random-weight checkpoint to %s", path)
        partial = path.with_name(f".{path.name}.{os.getpid()}")  # never leave a truncated file
        make_checkpoint(partial, cfg, seed=params.seed)
        partial.replace(path)
    return CheckpointRef(path=str(path), sha256=file_sha256(path), generated=True)


GENERATED_FRAMES = 10


def _calibration_set(params: PTQParams, cfg: Any, root: Path, info_path: str | None) -> Any:
    from bevfusion_ptq.data import build_calibration_set

    return build_calibration_set(
        root, info_path, cfg.data, params.calib_batches,
        sampling=params.calib_sampling, pipeline=params.calib_pipeline, seed=params.seed,
    )


def prepare_dataset(params: PTQParams) -> DatasetRef:
    """Choose the calibration samples (generating a nuScenes-format tree when none is given)."""
    from bevfusion_ptq.data import make_dataset

    cfg, _ = config_identity(params)
    generated = params.data_root is None
    if generated:
        # The generator keeps its last scene for val: one scene more than the batches need.
        scenes = max(2, math.ceil(params.calib_batches / GENERATED_FRAMES) + 1)
        root = state_dir() / "data" / f"generated-{scenes}x{GENERATED_FRAMES}-seed{params.seed}"
        if not (root / "nuscenes_infos_train.pkl").is_file():
            log.info("no --data-root given: generating a nuScenes-format tree at %s", root)
            make_dataset(root, scenes=scenes, frames=GENERATED_FRAMES, seed=params.seed)
    else:
        root = Path(params.data_root)
    calib = _calibration_set(params, cfg, root, None)
    return DatasetRef(
        data_root=str(root),
        info_path=str(calib.info_path),
        tokens=list(calib.tokens),
        fingerprint=calib.fingerprint,
        generated=generated,
    )


def load_model_stage(params: PTQParams, ckpt: CheckpointRef) -> StageRef:
    """Build the float model from the config and load the checkpoint strictly."""
    from bevfusion_ptq.model.checkpoint import load_model as load_float_model

    cfg, cfg_hash = config_identity(params)
    made_from = {"checkpoint": ckpt.sha256, "config": cfg_hash}
    model = load_float_model(cfg, ckpt.path)
    return save_model(model, "load_model", stage_key("load_model", **made_from), made_from)


def insert_quantizers_stage(params: PTQParams, ref: StageRef) -> StageRef:
    """Apply the rule set (quantizers are created, not yet calibrated)."""
    model = load_model(ref)
    rules = bevfusion_rules(tuple(params.exclude))
    plan = insert_quantizers(model, rules)
    made_from = {"model": ref.key, "rules": rules.name, "quantized_modules": len(plan.modules)}
    return save_model(model, "insert_quantizers", stage_key("insert_quantizers", **made_from), made_from)


def fuse_bn_stage(ref: StageRef) -> StageRef:
    """Fold BatchNorm into the convolutions."""
    model = load_model(ref).eval()
    folded = fuse_bn(model)
    made_from = {"model": ref.key, "folded": folded}
    return save_model(model, "fuse_bn", stage_key("fuse_bn", **made_from), made_from)


def calibrate_stage(
    params: PTQParams, ref: StageRef, data: DatasetRef, progress: ProgressFn | None = None
) -> StageRef:
    """Collect on the calibration samples, compute amax, then disable the excluded quantizers."""
    cfg, _ = config_identity(params)
    device = resolve_device(params.device)
    model = load_model(ref).to(device).eval()
    calib = _calibration_set(params, cfg, Path(data.data_root), data.info_path)
    if calib.fingerprint != data.fingerprint:
        raise ConfigError(f"calibration data under {data.data_root} changed since it was chosen")
    loader = calib.loader(pin_memory=device.type == "cuda")
    log.info("calibrating %d batches on %s with method %s", params.calib_batches, device, params.calib_method)
    result = calibrate(
        model, loader, method=params.calib_method, num_batches=params.calib_batches,
        percentile=params.percentile, progress=progress,
    )
    disabled = apply_exclusions(model, tuple(params.exclude))
    made_from = {
        "model": ref.key,
        "data": data.fingerprint,
        "method": params.calib_method,
        "percentile": params.percentile,
        "batches": params.calib_batches,
        "exclude": sorted(params.exclude),
        "disabled": len(disabled),
        "seconds": round(result.seconds, 3),
    }
    key = stage_key("calibrate", **{k: v for k, v in made_from.items() if k != "seconds"})
    return save_model(model.cpu(), "calibrate", key, made_from)


def version_id(params: PTQParams, ckpt: CheckpointRef, data: DatasetRef, calibrated: StageRef) -> str:
    """Deterministic version: same inputs and code, same version."""
    _, cfg_hash = config_identity(params)
    return data_sha256(
        {
            "checkpoint": ckpt.sha256,
            "config": cfg_hash,
            "data": data.fingerprint,
            "calibration": calibrated.key,
            "package": __version__,
        }
    )[:16]


def save_artifacts_stage(
    params: PTQParams, calibrated: StageRef, ckpt: CheckpointRef, data: DatasetRef
) -> SavedVersion:
    """Write ``<output>/<model>/<version>/`` with the model, its quantizer table and a manifest."""
    cfg, cfg_hash = config_identity(params)
    model = load_model(calibrated)
    status = [row.as_dict() for row in quantizer_status(model, params.calib_method)]
    return save_artifacts(
        model,
        status,
        params.output,
        model_name=Path(params.config).stem.replace("_", "-"),
        version=version_id(params, ckpt, data, calibrated),
        inputs={
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
        },
        extra_files={"config.json": cfg.to_dict()},
    )
