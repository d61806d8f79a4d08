"""The disk, checked before the long work and named when a write fails.

Without this, a read-only ``--output`` is found only after calibration (a raw ``OSError:
[Errno 30]`` in save-artifacts), and a full disk surfaces as torch's ``enforce fail at
inline_container.cc ... unexpected pos``, which never says "disk". :func:`check_room`
runs before calibration; :func:`disk_errors` turns a failed write into one line that says
"disk full" or "read-only". Writers stay atomic (temporary name, then rename), so nothing
already saved or published is touched by a failed write.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bevfusion_ptq.errors import DiskError

MB = 1 << 20


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (where its files would land)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _describe(exc: OSError, path: Path, action: str) -> str | None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(_existing(path)).free
        return f"disk full: cannot {action} {path} ({free / MB:.0f} MB free there)"
    if exc.errno == errno.EROFS:
        return f"read-only file system: cannot {action} {path}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to {action} {path}"
    return None


def disk_error(exc: BaseException, path: str | Path, action: str = "write") -> DiskError | None:
    """``exc`` of a write to ``path`` as a one-line :class:`DiskError`, or None if not the disk's."""
    path = Path(path)
    if isinstance(exc, OSError):
        message = _describe(exc, path, action)
        return None if message is None else DiskError(message)
    if isinstance(exc, RuntimeError) and ("inline_container" in str(exc) or "PytorchStreamWriter" in str(exc)):
        # torch's zip writer reports ENOSPC as a failed enforce with no errno.
        free = shutil.disk_usage(_existing(path)).free
        reason = "disk full" if free < 64 * MB else "write failed"
        return DiskError(f"{reason}: cannot {action} {path} ({free / MB:.0f} MB free there; torch's writer stopped)")
    return None


@contextmanager
def disk_errors(path: str | Path, action: str = "write") -> Iterator[None]:
    """Re-raise a failed write to ``path`` as a one-line :class:`DiskError` when it is the disk."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        named = disk_error(exc, path, action)
        if named is None:
            raise
        raise named from exc


def check_room(path: str | Path, need_bytes: int, what: str) -> None:
    """Fail now, in one line, when ``path`` cannot take ``need_bytes`` of ``what``.

    Creates the directory (as the run would) and writes a probe file: permission bits
    and mount flags both show up there, whatever ``os.access`` would answer.
    """
    path = Path(path)
    with disk_errors(path, f"write {what} to"):
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise DiskError(
            f"disk full: {path} has {free / MB:.0f} MB free, {what} need about {need_bytes / MB:.0f} MB"
        )
