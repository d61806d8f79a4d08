"""The run's inputs: the checkpoint (given, fetched from S3, embedded, or random) and the calibration data."""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

import torch

from bevfusion_ptq.errors import CheckpointError, ConfigError
from bevfusion_ptq.hashing import data_sha256, file_sha256
from bevfusion_ptq.params import MIN_REAL_CALIB_BATCHES, REAL_CALIB_BATCHES, PTQParams
from bevfusion_ptq.pipeline.keys import stage_key
from bevfusion_ptq.pipeline.refs import CheckpointRef, DatasetRef
from bevfusion_ptq.workdir import state_dir

log = logging.getLogger(__name__)

GENERATED_FRAMES = 10


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when present; asking for CUDA without it is a config error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch sees no CUDA device")
    return torch.device(device)


def config_identity(params: PTQParams) -> tuple[Any, str]:
    """The resolved config and its hash (what the model and data stages depend on).

    Memoised per file and mtime: keys are computed often, and an edited config still gets a
    new hash. The returned config is shared; callers must not modify it.
    """
    from bevfusion_ptq.model.config import config_path

    path = config_path(params.config)
    return _load_config(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _load_config(path: str, _mtime_ns: int) -> tuple[Any, str]:
    from bevfusion_ptq.model.config import load_config

    cfg = load_config(path)
    return cfg, data_sha256(cfg.to_dict())


def _file_stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _checkpoint_identity(params: PTQParams) -> dict[str, Any]:
    """What the checkpoint stage will read, without reading it: a stat, an ETag, or the seed."""
    from bevfusion_ptq.model.embedded import RANDOM, embedded_checkpoint

    source = params.checkpoint
    embedded = embedded_checkpoint(params.config) if not source else None
    if embedded is not None:
        return {"embedded": _file_stamp(embedded)}
    if not source or source == RANDOM:
        return {"random": config_identity(params)[1], "seed": params.seed}
    if source.startswith("s3://"):
        from bevfusion_ptq.s3.fetch import remote_identity

        return {"url": source, **remote_identity(source)}
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return _file_stamp(path)


def prepare_checkpoint_key(params: PTQParams) -> str:
    return stage_key("prepare_checkpoint", prepare_checkpoint, params, checkpoint=_checkpoint_identity(params))


def prepare_checkpoint(params: PTQParams) -> CheckpointRef:
    """The user's checkpoint (downloaded first when it is an s3:// URL), hashed; without one,
    the config's embedded checkpoint (bevfusion-tiny) or else a random reference-layout one,
    written once per config and seed; ``random`` asks for the random one explicitly."""
    from bevfusion_ptq.model.checkpoint import make_checkpoint
    from bevfusion_ptq.model.embedded import RANDOM, embedded_checkpoint, verify_embedded

    source = params.checkpoint
    embedded = embedded_checkpoint(params.config) if not source else None
    if embedded is not None:
        sha = file_sha256(embedded)
        verify_embedded(embedded, sha)
        log.info("no --checkpoint given: using the embedded trained checkpoint %s", embedded)
        return CheckpointRef(path=str(embedded), sha256=sha, generated=False, source=f"embedded:{embedded.name}")
    if source == RANDOM:
        source = None
    if source and source.startswith("s3://"):
        from bevfusion_ptq.s3 import download_checkpoint

        path = download_checkpoint(source, state_dir() / "checkpoints" / "s3")
        return CheckpointRef(path=str(path), sha256=file_sha256(path), generated=False, source=source)
    if source:
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        return CheckpointRef(path=str(path.resolve()), sha256=file_sha256(path), generated=False, source=source)
    cfg, _ = config_identity(params)
    path = random_checkpoint_path(params)
    if not path.is_file():
        log.info("writing a random-weight checkpoint to %s", path)
        make_checkpoint(path, cfg, seed=params.seed)  # written atomically: never a truncated file
    return CheckpointRef(path=str(path), sha256=file_sha256(path), generated=True, source="random")


def random_checkpoint_path(params: PTQParams) -> Path:
    return state_dir() / "checkpoints" / f"{params.model_name}-random-seed{params.seed}.pth"


def generated_root(params: PTQParams) -> Path:
    # The generator keeps its last scene for val: one scene more than the batches need.
    scenes = max(2, math.ceil(params.requested_calib_batches / GENERATED_FRAMES) + 1)
    return state_dir() / "data" / f"generated-{scenes}x{GENERATED_FRAMES}-seed{params.seed}"


def generated_tree_complete(root: Path) -> bool:
    """A generated tree with its info files and nuScenes tables (trees generated before the
    generator wrote tables are generated again: same seed, same bytes, plus the tables)."""
    from bevfusion_ptq.data.nuscenes_tables import GENERATED_VERSION

    return (root / "nuscenes_infos_train.pkl").is_file() and (root / GENERATED_VERSION / "map.json").is_file()


def _dataset_identity(params: PTQParams) -> dict[str, Any]:
    from bevfusion_ptq.data.calibration_set import DEFAULT_INFO_NAME

    if params.data_root is None:
        return {"generated": generated_root(params).name}
    info = Path(params.data_root) / DEFAULT_INFO_NAME
    return {"root": str(Path(params.data_root).resolve()), "info": _file_stamp(info) if info.is_file() else None}


def prepare_dataset_key(params: PTQParams) -> str:
    return stage_key(
        "build_dataset", prepare_dataset, params,
        config=config_identity(params)[1], data=_dataset_identity(params),
    )


def calibration_set(
    params: PTQParams, data_root: Path, num_samples: int, info_path: str | None = None, *, cap: bool = False
) -> Any:
    """``num_samples`` keyframes chosen as the parameters say (the stages that read batches
    rebuild the set from the count the dataset stage settled on); ``cap`` takes all the
    keyframes when the tree holds fewer."""
    from bevfusion_ptq.data import build_calibration_set

    cfg, _ = config_identity(params)
    return build_calibration_set(
        data_root, info_path, cfg.data, num_samples,
        sampling=params.calib_sampling, pipeline=params.calib_pipeline, seed=params.seed, cap=cap,
    )


def prepare_dataset(params: PTQParams) -> DatasetRef:
    """Choose the calibration samples (generating a nuScenes-format tree when none is given).

    The number of batches is ``--calib-batches``, or the default for the data
    (:attr:`PTQParams.requested_calib_batches`): on a real tree that default is capped at the
    keyframes it holds, while an explicit request larger than the tree fails. A real tree
    calibrated on fewer than :data:`MIN_REAL_CALIB_BATCHES` keyframes is warned about.
    """
    from bevfusion_ptq.data import make_dataset

    generated = params.data_root is None
    if generated:
        root = generated_root(params)
        if not generated_tree_complete(root):
            scenes = int(root.name.split("-")[1].split("x")[0])
            log.info("no --data-root given: generating a nuScenes-format tree at %s", root)
            make_dataset(root, scenes=scenes, frames=GENERATED_FRAMES, seed=params.seed)
    else:
        root = Path(params.data_root)
    calib = calibration_set(
        params, root, params.requested_calib_batches, cap=not generated and params.calib_batches is None
    )
    if not generated and len(calib) < MIN_REAL_CALIB_BATCHES:
        log.warning(
            "calibrating on %d keyframes of a real tree: the reference uses %d batches and its maintainers "
            "advise about 400 distinct keyframes; fewer than %d rarely represent the data",
            len(calib), REAL_CALIB_BATCHES, MIN_REAL_CALIB_BATCHES,
        )
    return DatasetRef(
        data_root=str(root),
        info_path=str(calib.info_path),
        tokens=list(calib.tokens),
        fingerprint=calib.fingerprint,
        generated=generated,
    )


def open_calibration_set(params: PTQParams, data: DatasetRef) -> Any:
    """The chosen set again, refusing data that changed since it was chosen."""
    calib = calibration_set(params, Path(data.data_root), len(data.tokens), data.info_path)
    if calib.fingerprint != data.fingerprint:
        raise ConfigError(
            f"calibration data under {data.data_root} changed since it was chosen; "
            "run again with --refresh-cache to choose it anew"
        )
    return calib
