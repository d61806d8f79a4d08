"""The stages up to a calibrated model, chained in one process (no orchestrator).

For plain scripts, benchmarks and tests that want what the flow's first half produces; the
flow itself runs the same stages as separate, cached Prefect tasks.
"""

from __future__ import annotations

from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.amax_stage import compute_amax_stage
from bevfusion_ptq.pipeline.collect_stage import collect_statistics_stage
from bevfusion_ptq.pipeline.inputs import prepare_checkpoint, prepare_dataset
from bevfusion_ptq.pipeline.model_stages import fuse_bn_stage, insert_quantizers_stage, load_model_stage
from bevfusion_ptq.pipeline.refs import CheckpointRef, DatasetRef, StageRef


def calibrated_in_process(params: PTQParams) -> tuple[CheckpointRef, DatasetRef, StageRef]:
    """Checkpoint, data and the calibrated model (amax set, exclusions applied), as the flow
    makes them: load, insert quantizers, fold BN, collect statistics, compute amax."""
    ckpt = prepare_checkpoint(params)
    data = prepare_dataset(params)
    ref = load_model_stage(params, ckpt)
    ref = insert_quantizers_stage(params, ref)
    ref = fuse_bn_stage(params, ref)
    stats = collect_statistics_stage(params, ref, data)
    return ckpt, data, compute_amax_stage(params, ref, stats, data)
