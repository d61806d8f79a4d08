"""One Prefect task per PTQ stage, each a thin call into :mod:`bevfusion_ptq.pipeline`.

Caching: each task's cache key is the pipeline's content key for the same arguments
(checkpoint sha256, config hash, dataset fingerprint, the stage's parameters, the package
version and stage source, the upstream keys). Results (small descriptors, never models) and
cache records live under the state directory, and ``SERIALIZABLE`` isolation with a
file-system lock manager (:mod:`tasks.locks`: a dead holder's lock is broken) makes a concurrent identical run on the same host wait for the
first one and then take its result instead of computing it again. Across hosts the state
directory (results, locks, work files) must be one shared file system, or the lock manager
a shared one (Prefect's Redis lock manager).

Retries: errors caused by the inputs (:class:`~bevfusion_ptq.errors.PTQError`: a bad config,
a missing file, a key mismatch) fail at once; anything else (CUDA out of memory, a killed
data worker, an injected fault) is retried with exponential backoff, and statistics collection
resumes from its last saved state.

Timeouts: Prefect can only interrupt a sync task between Python bytecodes, never inside a
long CUDA or spconv call. The flow runs the tasks in its own thread (no task runner
threads) so the timeout can be delivered there at all, and collection also gets a deadline
that it checks between batches, saving its state before it stops.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.filesystems import LocalFileSystem
from prefect.logging import get_run_logger
from prefect.runtime import task_run
from prefect.tasks import exponential_backoff

from bevfusion_ptq import pipeline
from bevfusion_ptq.artifacts import SavedVersion
from bevfusion_ptq.errors import PTQError
from bevfusion_ptq.evaluation.gate import GateVerdict
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.progress import Bar
from bevfusion_ptq.workdir import state_dir
from tasks.locks import LeasedLockManager
from tasks.retries import retry_unless_input_error

FAIL_AT_BATCH_ENV = "BEVFUSION_PTQ_FAIL_AT_BATCH"
CALIBRATE_TIMEOUT_S = 6 * 3600


def _keyed(key_fn: Callable[..., str]) -> CacheKeyFnPolicy:
    """A Prefect cache policy whose key is the pipeline's content key of the task's arguments."""
    accepted = set(inspect.signature(key_fn).parameters)
    return CacheKeyFnPolicy(cache_key_fn=lambda _ctx, inputs: key_fn(**{k: v for k, v in inputs.items() if k in accepted}))


def _stage(name: str, key_fn: Callable[..., str], timeout_s: float, **options: Any) -> Callable[[Callable], Task]:
    return task(
        name=name,
        cache_policy=_keyed(key_fn),
        persist_result=True,
        retry_condition_fn=retry_unless_input_error,
        timeout_seconds=timeout_s,
        **options,
    )


@_stage("prepare-checkpoint", pipeline.prepare_checkpoint_key, 3600, retries=2, retry_delay_seconds=exponential_backoff(10))
def prepare_checkpoint(params: PTQParams) -> pipeline.CheckpointRef:
    return pipeline.prepare_checkpoint(params)


@task(name="check-disk", cache_policy=NO_CACHE, retries=0)
def check_disk(params: PTQParams, ckpt: pipeline.CheckpointRef) -> dict[str, int]:
    """Not cached: the disk fills up between runs. A read-only or full disk fails here, in one line."""
    return pipeline.check_disk(params, ckpt)


@_stage("build-dataset", pipeline.prepare_dataset_key, 3600)
def build_dataset(params: PTQParams) -> pipeline.DatasetRef:
    return pipeline.prepare_dataset(params)


@_stage("load-model", pipeline.load_model_key, 1800)
def load_model(params: PTQParams, ckpt: pipeline.CheckpointRef) -> pipeline.StageRef:
    return pipeline.load_model_stage(params, ckpt)


@_stage("insert-quantizers", pipeline.insert_quantizers_key, 600)
def insert_quantizers(params: PTQParams, ref: pipeline.StageRef) -> pipeline.StageRef:
    return pipeline.insert_quantizers_stage(params, ref)


@_stage("fuse-bn", pipeline.fuse_bn_key, 600)
def fuse_bn(params: PTQParams, ref: pipeline.StageRef) -> pipeline.StageRef:
    return pipeline.fuse_bn_stage(params, ref)


class _ProgressArtifact:
    """A keyed Prefect progress artifact, updated at most every few seconds (it is an API
    call), and a terminal bar when stderr is one; called as ``progress(seen, total)``."""

    def __init__(self, what: str, unit: str, total: int = 0) -> None:
        self.what, self.unit = what, unit
        slug = what.split(" ")[0]
        self.id = create_progress_artifact(0.0, key=f"{slug}-progress", description=f"{what}: 0 of {total} {unit}")
        self.last = 0.0
        self.bar = Bar(total, slug, unit.rstrip("s"))

    def __call__(self, seen: int, total: int) -> None:
        self.bar(seen, total)
        now = time.monotonic()
        if seen == total or now - self.last >= 3.0:
            description = f"{self.what}: {seen} of {total} {self.unit}"
            update_progress_artifact(self.id, 100.0 * seen / total, description=description)
            self.last = now


@_stage(
    "collect-statistics", pipeline.collect_statistics_key, CALIBRATE_TIMEOUT_S,
    tags=["gpu"], retries=3, retry_delay_seconds=exponential_backoff(10), retry_jitter_factor=0.5,
)
def collect_statistics(params: PTQParams, ref: pipeline.StageRef, data: pipeline.DatasetRef) -> pipeline.StageRef:
    fail_at = os.environ.get(FAIL_AT_BATCH_ENV)
    first_attempt = task_run.get_run_count() <= 1
    if task_run.get_run_count() > 1:
        get_run_logger().info("attempt %d: resuming from the last saved calibration state", task_run.get_run_count())
    return pipeline.collect_statistics_stage(
        params, ref, data,
        progress=_ProgressArtifact("calibration", "batches", len(data.tokens)),
        fail_at_batch=int(fail_at) if fail_at and first_attempt else None,
        deadline=time.monotonic() + CALIBRATE_TIMEOUT_S - 120,
    )


@_stage("sensitivity", pipeline.sensitivity_key, 3 * 3600, tags=["gpu"], retries=1, retry_delay_seconds=30)
def sensitivity(
    params: PTQParams, ref: pipeline.StageRef, stats: pipeline.StageRef, data: pipeline.DatasetRef
) -> pipeline.SensitivityRef:
    return pipeline.sensitivity_stage(params, ref, stats, data)


@_stage("compute-amax", pipeline.compute_amax_key, 1800)
def compute_amax(
    params: PTQParams,
    ref: pipeline.StageRef,
    stats: pipeline.StageRef,
    data: pipeline.DatasetRef,
    sensitivity: pipeline.SensitivityRef | None = None,
) -> pipeline.StageRef:
    return pipeline.compute_amax_stage(params, ref, stats, data, sensitivity)


@_stage("fidelity-report", pipeline.fidelity_key, 3600, tags=["gpu"], retries=1, retry_delay_seconds=30)
def fidelity(params: PTQParams, ref: pipeline.StageRef, data: pipeline.DatasetRef) -> pipeline.FidelityRef:
    return pipeline.fidelity_stage(params, ref, data)


@_stage("export-onnx", pipeline.export_key, 3600)
def export(params: PTQParams, calibrated: pipeline.StageRef, data: pipeline.DatasetRef) -> pipeline.ExportRef:
    return pipeline.export_stage(params, calibrated, data)


@_stage("evaluate", pipeline.evaluate_key, 6 * 3600, tags=["gpu"], retries=1, retry_delay_seconds=30)
def evaluate(params: PTQParams, ref: pipeline.StageRef, data: pipeline.DatasetRef) -> pipeline.EvaluationRef:
    progress = _ProgressArtifact("evaluation (FP32 + INT8)", "keyframes") if params.eval_samples != 0 else None
    return pipeline.evaluate_stage(params, ref, data, progress=progress)


@_stage("save-artifacts", pipeline.save_artifacts_key, 1800)
def save_artifacts(
    params: PTQParams,
    calibrated: pipeline.StageRef,
    ckpt: pipeline.CheckpointRef,
    data: pipeline.DatasetRef,
    fidelity: pipeline.FidelityRef,
    flow_run_id: str | None = None,
    evaluation: pipeline.EvaluationRef | None = None,
    verdict: GateVerdict | None = None,
    exported: pipeline.ExportRef | None = None,
) -> SavedVersion:
    return pipeline.save_artifacts_stage(
        params, calibrated, ckpt, data, fidelity, flow_run_id, evaluation, verdict, exported
    )


_STAGE_NAMES = {
    prepare_checkpoint: "prepare_checkpoint",
    build_dataset: "build_dataset",
    load_model: "load_model",
    insert_quantizers: "insert_quantizers",
    fuse_bn: "fuse_bn",
    collect_statistics: "collect_statistics",
    compute_amax: "compute_amax",
    sensitivity: "sensitivity",
    fidelity: "fidelity",
    export: "export",
    evaluate: "evaluate",
    save_artifacts: "save_artifacts",
}


class StageRunner:
    """Runs stage tasks with this run's storage, locking and cache checks; times each one.

    Storage and lock paths follow the state directory at run time (it is per test, per
    deployment, per user), so they are set here rather than when the tasks are defined. A
    cached result whose files are gone (a cleaned work directory or output) is recomputed
    with ``refresh_cache`` instead of being handed to the next stage.
    """

    def __init__(self) -> None:
        home = state_dir() / "prefect-cache"
        # Prefect wants result storage saved as a block; one per state directory.
        name = "bevfusion-ptq-" + hashlib.sha256(str(home).encode()).hexdigest()[:12]
        storage = LocalFileSystem(basepath=str(home / "results"))
        storage.save(name, overwrite=True)
        self.storage = storage
        self.keys = str(home / "keys")  # cache records; must not share a folder with the results
        self.locks = LeasedLockManager(home / "locks")  # a killed holder's lock is broken
        self.timings: dict[str, float] = {}
        self.states: dict[str, str] = {}  # task name -> final state name ("Cached", "Completed")

    def __call__(self, stage_task: Task, **inputs: Any) -> Any:
        stage = _STAGE_NAMES[stage_task]
        policy = stage_task.cache_policy.configure(
            key_storage=self.keys, lock_manager=self.locks, isolation_level="SERIALIZABLE"
        )
        options: dict[str, Any] = {"cache_policy": policy, "result_storage": self.storage}
        if self._stale(stage, policy, inputs):
            options["refresh_cache"] = True
        started = time.perf_counter()
        try:
            state = stage_task.with_options(**options)(**inputs, return_state=True)
            self.states[stage_task.name] = state.name
            return state.result()
        finally:
            self.timings[stage_task.name] = round(time.perf_counter() - started, 3)

    @property
    def recomputed(self) -> list[str]:
        """The stages that ran rather than came from the cache."""
        return [name for name, state in self.states.items() if state != "Cached"]

    def _stale(self, stage: str, policy: CacheKeyFnPolicy, inputs: dict[str, Any]) -> bool:
        """A cache record exists but the files it points to are gone.

        Only then is the cache bypassed: with no record yet, a concurrent identical run must
        still go through the lock and wait for the first one's result.
        """
        try:
            key = policy.compute_key(task_ctx=None, inputs=inputs, flow_parameters={})
        except PTQError:
            return False  # the task itself reports the bad input
        if key is None or not (Path(self.keys) / key).exists():
            return False
        present = pipeline.output_present(stage, **{k: v for k, v in inputs.items() if k != "flow_run_id"})
        return not present
