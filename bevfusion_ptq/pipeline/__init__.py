"""The PTQ job as plain library calls, one module per stage.

Each stage takes and returns small descriptors (:mod:`.refs`), so an orchestrator
(``tasks/`` and ``flows/``) can run them as separate, cached steps, and a plain script can
chain them directly::

    ckpt = prepare_checkpoint(params)
    data = prepare_dataset(params)
    ref = load_model_stage(params, ckpt)
    ref = insert_quantizers_stage(params, ref)
    ref = fuse_bn_stage(params, ref)
    stats = collect_statistics_stage(params, ref, data)
    sens = sensitivity_stage(params, ref, stats, data)  # optional: ranks groups, proposes exclusions
    ref = compute_amax_stage(params, ref, stats, data, sens)  # without sens: calibrated_in_process(params)
    fid = fidelity_stage(params, ref, data)
    exp = export_stage(params, ref, data)
    ev = evaluate_stage(params, ref, data)
    verdict = gate_stage(params, ev, fid)
    saved = save_artifacts_stage(params, ref, ckpt, data, fid, exported=exp, evaluation=ev, verdict=verdict)
    # publish_version(saved.path, params.output) only when not verdict.failed

Every stage has a ``*_key`` function over the same arguments (:mod:`.keys`): the content
hash that names its work directory and serves as its cache key.
"""

from bevfusion_ptq.pipeline.amax_stage import compute_amax_key, compute_amax_stage
from bevfusion_ptq.pipeline.chain import calibrated_in_process
from bevfusion_ptq.pipeline.collect_stage import (
    CalibrationInterrupted,
    InjectedFault,
    collect_statistics_key,
    collect_statistics_stage,
)
from bevfusion_ptq.pipeline.export_stage import export_key, export_stage
from bevfusion_ptq.pipeline.evaluate_stage import evaluate_key, evaluate_stage
from bevfusion_ptq.pipeline.fidelity_stage import fidelity_key, fidelity_stage
from bevfusion_ptq.pipeline.gate_stage import gate_stage
from bevfusion_ptq.pipeline.inputs import (
    config_identity,
    prepare_checkpoint,
    prepare_checkpoint_key,
    prepare_dataset,
    prepare_dataset_key,
    resolve_device,
)
from bevfusion_ptq.pipeline.model_stages import (
    fuse_bn_key,
    fuse_bn_stage,
    insert_quantizers_key,
    insert_quantizers_stage,
    load_model_key,
    load_model_stage,
)
from bevfusion_ptq.pipeline.outputs import output_present
from bevfusion_ptq.pipeline.refs import (
    CheckpointRef,
    DatasetRef,
    EvaluationRef,
    ExportRef,
    FidelityRef,
    SensitivityRef,
    StageRef,
)
from bevfusion_ptq.pipeline.room import check_disk
from bevfusion_ptq.pipeline.save_stage import local_root, save_artifacts_key, save_artifacts_stage, version_id
from bevfusion_ptq.pipeline.sensitivity_stage import sensitivity_key, sensitivity_stage

__all__ = [
    "CalibrationInterrupted", "CheckpointRef", "DatasetRef", "FidelityRef", "InjectedFault", "StageRef",
    "EvaluationRef", "evaluate_key", "evaluate_stage", "gate_stage",
    "check_disk", "collect_statistics_key", "collect_statistics_stage", "compute_amax_key", "compute_amax_stage",
    "config_identity", "fidelity_key", "fidelity_stage", "fuse_bn_key",
    "fuse_bn_stage", "insert_quantizers_key", "insert_quantizers_stage", "load_model_key", "load_model_stage",
    "local_root", "output_present", "prepare_checkpoint", "prepare_checkpoint_key", "prepare_dataset",
    "prepare_dataset_key", "resolve_device", "save_artifacts_key", "save_artifacts_stage", "version_id",
    "ExportRef", "export_key", "export_stage", "SensitivityRef", "sensitivity_key", "sensitivity_stage",
    "calibrated_in_process",
]
