"""Model configs: shipped ones by name, or a user's OpenMMLab Python config file.

The format is mmengine's Python config (``model = dict(type=..., ...)``, ``data =
dict(...)``), the one BEVFusion users already know, loaded with ``mmengine.Config``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mmengine.config import Config

from ..errors import ConfigError

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

#: accepted name -> shipped file stem
CONFIG_NAMES: dict[str, str] = {
    "bevfusion-r50": "bevfusion_r50",
    "bevfusion_r50": "bevfusion_r50",
    "bevfusion-tiny": "bevfusion_tiny",
    "bevfusion_tiny": "bevfusion_tiny",
}

REQUIRED_SECTIONS = ("model", "data")


def config_path(name_or_path: str | Path) -> Path:
    """The file behind a shipped name or a user path; :class:`ConfigError` if neither."""
    text = str(name_or_path)
    if text in CONFIG_NAMES:
        return CONFIG_DIR / f"{CONFIG_NAMES[text]}.py"
    path = Path(text).expanduser()
    if path.suffix == ".py" and path.is_file():
        return path
    valid = ", ".join(sorted({n for n in CONFIG_NAMES if "-" in n}))
    if path.suffix == ".py":
        raise ConfigError(f"config file {path} does not exist (shipped configs: {valid})")
    raise ConfigError(f"unknown config {text!r}: use one of {valid}, or a path to a .py config file")


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
