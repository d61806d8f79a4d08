"""Files that appear whole or not at all.

Every writer of a file another process may read (work files, checkpoints, reports, records)
writes a hidden sibling and renames it into place: a crash or a concurrent reader never
sees a truncated file. One helper instead of a copy of the same five lines per writer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A temporary path beside ``target`` to write; renamed onto ``target`` when the block
    succeeds, removed when it fails. The parent directory is created."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def write_text(target: str | Path, text: str) -> None:
    """``Path.write_text``, atomically."""
    with atomic_path(target) as partial:
        partial.write_text(text)
