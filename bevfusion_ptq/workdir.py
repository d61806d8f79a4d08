"""Content-addressed work directory: where stages leave their outputs for the next stage.

Stages hand each other small :class:`StageRef` descriptors (a path, its sha256, and what it
was made from), never models: an orchestrator may serialise what passes between stages, and
a BEVFusion-R50 is hundreds of MB. The directory of a stage output is named by the hash of
everything that made it, so the same inputs always land in the same place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from bevfusion_ptq.atomic import atomic_path
from bevfusion_ptq.diskspace import disk_errors
from bevfusion_ptq.errors import PTQError
from bevfusion_ptq.hashing import file_sha256

if TYPE_CHECKING:  # torch is imported where models are saved or loaded, not for state_dir()
    from torch import nn


def state_dir() -> Path:
    """Project-local state (work files, generated data, random checkpoints, Prefect home).

    ``BEVFUSION_PTQ_HOME`` moves it; the default keeps everything beside the project so a run
    never writes into a user's global locations unasked.
    """
    return Path(os.environ.get("BEVFUSION_PTQ_HOME", ".bevfusion-ptq")).resolve()


class StageRef(BaseModel):
    """A stage output on disk, identified by the hash of its inputs."""

    stage: str
    key: str
    path: str
    sha256: str
    made_from: dict[str, Any]


def stage_dir(stage: str, key: str, root: Path | None = None) -> Path:
    """``<state>/work/<stage>/<key>/``: where a stage's output for ``key`` lives."""
    return (root or state_dir()) / "work" / stage / key


def stage_output(stage: str, key: str) -> Path:
    """The model file a model stage writes for ``key`` (it may not exist yet)."""
    return stage_dir(stage, key) / "model.pt"


def save_model(model: nn.Module, stage: str, key: str, made_from: dict[str, Any], root: Path | None = None) -> StageRef:
    """Pickle ``model`` (CPU copy) to ``<root>/work/<stage>/<key>/model.pt``, atomically."""
    from bevfusion_ptq.stable_save import save_stable  # imports torch: only where models are saved

    folder = stage_dir(stage, key, root)
    target = folder / "model.pt"
    with disk_errors(target, f"save the {stage} work file"), atomic_path(target) as partial:
        save_stable(model, partial)  # same model, same bytes (see stable_save)
    ref = StageRef(stage=stage, key=key, path=str(target), sha256=file_sha256(target), made_from=made_from)
    (folder / "stage.json").write_text(ref.model_dump_json(indent=2) + "\n")  # for people and tests
    return ref


def load_model(ref: StageRef) -> nn.Module:
    """Load a stage's model back, refusing a file that changed since the stage wrote it.

    The file is our own work file, so full unpickling is safe here (unlike user checkpoints).
    """
    import torch

    return torch.load(verified_path(ref), map_location="cpu", weights_only=False)


def verified_path(ref: StageRef, error: type[PTQError] = PTQError) -> Path:
    """The file a stage wrote, refused (as ``error``) when it is gone or changed since."""
    path = Path(ref.path)
    if not path.is_file():
        raise error(f"work file of stage {ref.stage} is missing: {path}; run again with --refresh-cache")
    if file_sha256(path) != ref.sha256:
        raise error(f"work file of stage {ref.stage} changed since it was written: {path}; run again with --refresh-cache")
    return path
