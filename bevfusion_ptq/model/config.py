"""Model configs: shipped ones by name, or a user's OpenMMLab Python config file.

The format is mmengine's Python config (``model = dict(type=..., ...)``, ``data =
dict(...)``), the one BEVFusion users already know, loaded with ``mmengine.Config``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mmengine.config import Config

from ..config_files import CONFIG_DIR, CONFIG_NAMES, config_path
from ..errors import ConfigError

__all__ = ["CONFIG_DIR", "CONFIG_NAMES", "REQUIRED_SECTIONS", "config_path", "load_config"]

logger = logging.getLogger(__name__)

REQUIRED_SECTIONS = ("model", "data")


def load_config(name_or_path: str | Path) -> Config:
    """Load a config by shipped name (``bevfusion-r50``, ``bevfusion-tiny``, underscores
    accepted) or by path to a user ``.py`` file.

    Raises:
        ConfigError: unknown name, missing or unreadable file, or no ``model``/``data``.
    """
    path = config_path(name_or_path)
    try:
        cfg = Config.fromfile(str(path))
    except Exception as exc:  # mmengine raises many types for a bad file
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    missing = [s for s in REQUIRED_SECTIONS if s not in cfg]
    if missing:
        raise ConfigError(f"config {path} lacks the section(s) {missing}")
    if "name" not in cfg:
        cfg.name = path.stem
    logger.debug("loaded config %s from %s", cfg.name, path)
    return cfg
