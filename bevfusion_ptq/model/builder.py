"""Build the model from a config through mmdet3d's registry."""

from __future__ import annotations

import logging
from typing import Any

import mmdet3d.models  # noqa: F401  (registers SparseEncoder, SECOND, SECONDFPN, spconv 2 ops)
from mmdet3d.registry import MODELS
from mmengine.config import Config
from torch import nn

from ..errors import ConfigError
from . import bevfusion, camera, fuser, lidar, transfusion, vtransform  # noqa: F401  (registration)
from .config import load_config

logger = logging.getLogger(__name__)


def _model_section(cfg: Config | str | Any) -> Any:
    if isinstance(cfg, str):
        cfg = load_config(cfg)
    model_cfg = cfg.get("model") if hasattr(cfg, "get") else None
    if model_cfg is None:
        raise ConfigError("config has no 'model' section")
    return model_cfg


def build_model(cfg: Config | str) -> nn.Module:
    """Build the BEVFusion model of a config (or a config name), in eval mode.

    Eval mode because this package only runs inference and calibration: BN statistics
    must never be updated by accident. Construction follows the ambient device (e.g.
    ``with torch.device("meta"):`` for a free shape check).
    """
    model_cfg = _model_section(cfg)
    try:
        model = MODELS.build(model_cfg)
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"cannot build the model from the config: {exc}") from exc
    return model.eval()
