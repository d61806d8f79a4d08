"""One Prefect task per PTQ stage, each a thin call into :mod:`bevfusion_ptq.pipeline`.

The tasks pass the library's small descriptors (paths + sha256), never models. Errors caused
by the inputs (:class:`~bevfusion_ptq.errors.PTQError`) are not retried: retrying cannot fix
a bad file.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from bevfusion_ptq import pipeline
from bevfusion_ptq.artifacts import SavedVersion
from bevfusion_ptq.errors import PTQError
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.workdir import StageRef


def retry_unless_input_error(task, task_run, state) -> bool:
    """Retry only failures that another attempt might not repeat."""
    try:
        state.result()
    except PTQError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return True


_STAGE = dict(cache_policy=NO_CACHE, retry_condition_fn=retry_unless_input_error)


@task(name="prepare-checkpoint", **_STAGE)
def prepare_checkpoint(params: PTQParams) -> pipeline.CheckpointRef:
    return pipeline.prepare_checkpoint(params)


@task(name="build-dataset", **_STAGE)
def build_dataset(params: PTQParams) -> pipeline.DatasetRef:
    return pipeline.prepare_dataset(params)


@task(name="load-model", **_STAGE)
def load_model(params: PTQParams, ckpt: pipeline.CheckpointRef) -> StageRef:
    return pipeline.load_model_stage(params, ckpt)


@task(name="insert-quantizers", **_STAGE)
def insert_quantizers(params: PTQParams, ref: StageRef) -> StageRef:
    return pipeline.insert_quantizers_stage(params, ref)


@task(name="fuse-bn", **_STAGE)
def fuse_bn(ref: StageRef) -> StageRef:
    return pipeline.fuse_bn_stage(ref)


@task(name="calibrate", tags=["gpu"], retries=2, retry_delay_seconds=[10, 60], **_STAGE)
def calibrate(params: PTQParams, ref: StageRef, data: pipeline.DatasetRef) -> StageRef:
    return pipeline.calibrate_stage(params, ref, data)


@task(name="save-artifacts", **_STAGE)
def save_artifacts(
    params: PTQParams, ref: StageRef, ckpt: pipeline.CheckpointRef, data: pipeline.DatasetRef
) -> SavedVersion:
    return pipeline.save_artifacts_stage(params, ref, ckpt, data)
