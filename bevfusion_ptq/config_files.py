"""Which file a ``--config`` names, without importing mmengine or the model.

Checking arguments and keying a re-run need the file (and its bytes), not the parsed
config; :mod:`bevfusion_ptq.model.config` parses it with mmengine.
"""

from __future__ import annotations

from pathlib import Path

from bevfusion_ptq.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: accepted name -> shipped file stem
CONFIG_NAMES: dict[str, str] = {
    "bevfusion-r50": "bevfusion_r50",
    "bevfusion_r50": "bevfusion_r50",
    "bevfusion-tiny": "bevfusion_tiny",
    "bevfusion_tiny": "bevfusion_tiny",
}


# What mmengine's Config.fromfile reads: a user's Python config, or the ``config.json`` a
# published version carries (the resolved config, so a version reloads without the original
# file, custom ``.py`` configs included).
CONFIG_SUFFIXES = (".py", ".json", ".yaml", ".yml")


def config_path(name_or_path: str | Path) -> Path:
    """The file behind a shipped name or a user path; :class:`ConfigError` if neither."""
    text = str(name_or_path)
    if text in CONFIG_NAMES:
        return CONFIG_DIR / f"{CONFIG_NAMES[text]}.py"
    path = Path(text).expanduser()
    if path.suffix in CONFIG_SUFFIXES and path.is_file():
        return path
    valid = ", ".join(sorted({n for n in CONFIG_NAMES if "-" in n}))
    if path.suffix in CONFIG_SUFFIXES:
        raise ConfigError(f"config file {path} does not exist (shipped configs: {valid})")
    raise ConfigError(f"unknown config {text!r}: use one of {valid}, or a path to a .py config file "
                      "(or a version's config.json)")
