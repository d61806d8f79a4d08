"""``torch.save`` whose bytes depend only on what is saved.

Two things make plain ``torch.save`` of the same model differ from run to run:

* given a path, torch names the zip's inner folder after the file (a temporary name with a
  PID gives other bytes) and records a random serialization id; written through a file
  object, the folder is always ``archive`` and the id is derived from the content;
* a pickled module carries its hooks keyed by handle ids from one process-wide counter, so
  the same model gets other keys depending on how many hooks the process made before (a
  stage that was cached this time, a retry). The keys only order the hooks: while saving they
  are renumbered 0, 1, ... per module, in the same order, and restored afterwards.

Work files and the published ``model.pth`` / ``state_dict.pth`` are written this way, so
identical inputs give identical files, sha256 and manifest in any state directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

_HOOK_DICTS = tuple(sorted(n for n, v in vars(nn.Module()).items() if "hook" in n and isinstance(v, dict)))


@contextmanager
def numbered_hooks(model: nn.Module | None) -> Iterator[None]:
    """Renumber every module's hook-dict keys 0, 1, ... (creation order) for the block."""
    replaced: list[tuple[nn.Module, str, dict]] = []
    try:
        for module in model.modules() if model is not None else ():
            dicts = {n: d for n in _HOOK_DICTS if isinstance(d := module.__dict__.get(n), dict) and d}
            ids = {k for d in dicts.values() for k in d}
            if not ids or not all(isinstance(k, int) for k in ids):
                continue
            number = {old: new for new, old in enumerate(sorted(ids))}
            for name, d in dicts.items():
                replaced.append((module, name, d))
                module.__dict__[name] = type(d)((number[k], v) for k, v in d.items())
        yield
    finally:
        for module, name, d in reversed(replaced):
            module.__dict__[name] = d


def save_stable(obj: Any, path: str | Path, model: nn.Module | None = None) -> None:
    """``torch.save(obj)`` to ``path`` with content-only bytes; ``model``: the module whose
    hooks ``obj`` pickles (default: ``obj`` itself when it is one)."""
    if model is None and isinstance(obj, nn.Module):
        model = obj
    with open(path, "wb") as fh, numbered_hooks(model):
        torch.save(obj, fh)
