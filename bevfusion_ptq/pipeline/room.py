"""Room for the run, checked before the long stages start (see :mod:`bevfusion_ptq.diskspace`)."""

from __future__ import annotations

from pathlib import Path

from bevfusion_ptq.diskspace import MB, check_room
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.refs import CheckpointRef
from bevfusion_ptq.pipeline.save_stage import local_root
from bevfusion_ptq.workdir import state_dir

WORK_COPIES = 4  # load-model, insert-quantizers, fuse-bn and calibrate each keep a model
OUTPUT_COPIES = 2  # model.pth and state_dict.pth
OUTPUT_EXTRA = 20 * MB  # plots, tables, manifest


def check_disk(params: PTQParams, ckpt: CheckpointRef) -> dict[str, int]:
    """Fail in one line before calibrating when the state or output directory cannot take
    the run's files (sizes estimated from the checkpoint's); the estimates, for the log."""
    size = Path(ckpt.path).stat().st_size
    need = {"work": WORK_COPIES * size, "output": OUTPUT_COPIES * size + OUTPUT_EXTRA}
    check_room(state_dir() / "work", need["work"], "the stages' work files")
    check_room(local_root(params), need["output"], "the artifacts")
    return need
