"""Which code produced an artifact: the package version and, from a git checkout, the commit."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from bevfusion_ptq import __version__

_ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def git_commit() -> str | None:
    """``<sha>`` or ``<sha>-dirty`` for a git checkout; None for an installed package."""
    if not (_ROOT / ".git").exists():
        return None
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_ROOT, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def code_version() -> dict[str, str | None]:
    return {"package_version": __version__, "git_commit": git_commit()}
