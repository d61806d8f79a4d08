"""Is a stage's output for these inputs still on disk?

An orchestrator that caches stage results by key (Prefect here) can only trust a cached
descriptor while the files it points to exist: someone may have cleaned the work directory
or the output. :func:`output_present` answers that before a stage is looked up, so the
orchestrator can recompute instead of handing a dangling path to the next stage.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline import inputs as stage_inputs
from bevfusion_ptq.pipeline.amax_stage import compute_amax_key
from bevfusion_ptq.pipeline.collect_stage import statistics_path
from bevfusion_ptq.pipeline.export_stage import export_present
from bevfusion_ptq.pipeline.evaluate_stage import evaluation_present
from bevfusion_ptq.pipeline.fidelity_stage import REPORT_FILE, fidelity_key
from bevfusion_ptq.pipeline.model_stages import fuse_bn_key, insert_quantizers_key, load_model_key
from bevfusion_ptq.pipeline.sensitivity_stage import RESULT_FILE, sensitivity_key
from bevfusion_ptq.pipeline.save_stage import saved_version_exists, version_dir
from bevfusion_ptq.workdir import stage_dir, stage_output


def _checkpoint_present(params: PTQParams) -> bool:
    from bevfusion_ptq.model.embedded import RANDOM, embedded_checkpoint

    if not params.checkpoint and embedded_checkpoint(params.config) is not None:
        return True
    if not params.checkpoint or params.checkpoint == RANDOM:
        return stage_inputs.random_checkpoint_path(params).is_file()
    if params.checkpoint.startswith("s3://"):
        return False  # cheap to re-check: the download is reused while the ETag holds
    return Path(params.checkpoint).is_file()


def _dataset_present(params: PTQParams) -> bool:
    if params.data_root is not None:
        return True  # the user's data: a change is caught by the fingerprint check
    return stage_inputs.generated_tree_complete(stage_inputs.generated_root(params))


def _model_stage(stage: str, key_fn: Callable[..., str]) -> Callable[..., bool]:
    return lambda **kw: stage_output(stage, key_fn(**kw)).is_file()


_PRESENT: dict[str, Callable[..., bool]] = {
    "prepare_checkpoint": lambda params: _checkpoint_present(params),
    "build_dataset": lambda params: _dataset_present(params),
    "load_model": _model_stage("load_model", load_model_key),
    "insert_quantizers": _model_stage("insert_quantizers", insert_quantizers_key),
    "fuse_bn": _model_stage("fuse_bn", fuse_bn_key),
    "collect_statistics": lambda **kw: statistics_path(**kw).is_file(),
    "compute_amax": _model_stage("compute_amax", compute_amax_key),
    "sensitivity": lambda **kw: (stage_dir("sensitivity", sensitivity_key(**kw)) / RESULT_FILE).is_file(),
    "fidelity": lambda params, ref, data: params.fidelity_batches == 0
    or (stage_dir("fidelity", fidelity_key(params, ref, data)) / REPORT_FILE).is_file(),
    "export": lambda params, calibrated, data: export_present(params, calibrated, data),
    "evaluate": evaluation_present,
    "save_artifacts": lambda **kw: saved_version_exists(version_dir(**{k: v for k, v in kw.items() if k != "flow_run_id"})),
}


def output_present(stage: str, **inputs: Any) -> bool:
    """True when the files a cached result of ``stage`` for ``inputs`` refers to all exist."""
    return _PRESENT[stage](**inputs)
