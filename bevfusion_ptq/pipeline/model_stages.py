"""The model stages before calibration: load the float model, insert quantizers, fold BN."""

from __future__ import annotations

from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.inputs import config_identity
from bevfusion_ptq.pipeline.keys import stage_key
from bevfusion_ptq.pipeline.refs import CheckpointRef, StageRef
from bevfusion_ptq.quant.fuse import fuse_bn
from bevfusion_ptq.quant.insert import insert_quantizers, warn_unmatched_exclusions
from bevfusion_ptq.quant.rules import bevfusion_rules
from bevfusion_ptq.workdir import load_model, save_model


def load_model_key(params: PTQParams, ckpt: CheckpointRef) -> str:
    return stage_key("load_model", load_model_stage, params, checkpoint=ckpt.sha256, config=config_identity(params)[1])


def load_model_stage(params: PTQParams, ckpt: CheckpointRef) -> StageRef:
    """Build the float model from the config and load the checkpoint strictly."""
    from bevfusion_ptq.model.checkpoint import load_model as load_float_model

    cfg, cfg_hash = config_identity(params)
    model = load_float_model(cfg, ckpt.path)
    made_from = {"checkpoint": ckpt.sha256, "config": cfg_hash}
    return save_model(model, "load_model", load_model_key(params, ckpt), made_from)


def insert_quantizers_key(params: PTQParams, ref: StageRef) -> str:
    return stage_key("insert_quantizers", insert_quantizers_stage, params, model=ref.key, rules=bevfusion_rules().name)


def insert_quantizers_stage(params: PTQParams, ref: StageRef) -> StageRef:
    """Apply the rule set (quantizers are created, not yet calibrated; exclusions come later)."""
    model = load_model(ref)
    plan = insert_quantizers(model, bevfusion_rules(tuple(params.exclude_patterns)))
    warn_unmatched_exclusions(model, tuple(params.exclude_patterns))  # a typo shows now, not after calibration
    made_from = {"model": ref.key, "rules": plan.rule_set, "quantized_modules": len(plan.modules)}
    return save_model(model, "insert_quantizers", insert_quantizers_key(params, ref), made_from)


def fuse_bn_key(params: PTQParams, ref: StageRef) -> str:
    return stage_key("fuse_bn", fuse_bn_stage, params, model=ref.key)


def fuse_bn_stage(params: PTQParams, ref: StageRef) -> StageRef:
    """Fold BatchNorm into the convolutions."""
    model = load_model(ref).eval()
    folded = fuse_bn(model)
    return save_model(model, "fuse_bn", fuse_bn_key(params, ref), {"model": ref.key, "folded": folded})
