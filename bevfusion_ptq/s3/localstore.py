"""The local-directory store: the S3 layout on disk, for the embedded default output.

A version appears by renaming a complete staging directory into place (atomic on POSIX);
``latest.json`` is swapped under an ``flock`` and replaced with ``os.replace``, so readers
see the old or the new pointer, never a torn one.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path

from bevfusion_ptq.errors import PublishError, VerificationError
from bevfusion_ptq.s3.manifest import MANIFEST, FileEntry, check_file
from bevfusion_ptq.s3.url import Location

log = logging.getLogger(__name__)


class LocalStore:
    def __init__(self, loc: Location) -> None:
        assert loc.path is not None
        self.loc, self.root = loc, loc.path

    def read(self, rel: str) -> tuple[bytes, str] | None:
        path = self.root / rel
        if not path.is_file():
            return None
        data = path.read_bytes()
        return data, hashlib.sha256(data).hexdigest()

    def swap(self, rel: str, data: bytes, token: str | None) -> bool:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read(rel)
            if (current[1] if current else None) != token:
                return False
            tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}"
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return True

    def download(self, rel: str, dest: Path) -> None:
        shutil.copyfile(self.root / rel, dest)

    def subdirs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def has_any(self, rel: str) -> bool:
        path = self.root / rel
        return path.is_dir() and any(path.iterdir())

    def repair_version(self, version_dir: Path, rel: str, published: list[dict], local: dict[str, FileEntry]) -> list[str]:
        """Check every file of a published version against its manifest; replace damaged ones
        by the intact local copy (checked again after the copy, then renamed into place)."""
        final = self.root / rel
        if final.resolve() == version_dir.resolve():
            return []
        repaired, beyond = [], []
        for f in published:
            try:
                check_file(final / f["name"], f, str(final))
                continue
            except VerificationError as exc:
                reason = str(exc)
            mine = local.get(f["name"])
            if mine is None or (mine.size, mine.sha256) != (f["size"], f["sha256"]):
                beyond.append(reason)
                continue
            log.warning("%s; replacing it by the intact local copy", reason)
            target = final / f["name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}.repair-{uuid.uuid4().hex[:12]}"
            try:
                shutil.copyfile(version_dir / f["name"], tmp)
                check_file(tmp, f, str(final))
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            repaired.append(f["name"])
        if beyond:
            raise PublishError(f"{'; '.join(beyond)}; this local copy does not hold the manifest's bytes either")
        return repaired

    def put_version(self, version_dir: Path, rel: str, manifest_raw: bytes, entries: list[FileEntry]) -> bool:
        final = self.root / rel
        if final.resolve() == version_dir.resolve():
            return True  # saved in place by save_artifacts: already complete and verified
        if (final / MANIFEST).is_file():
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".{final.name}.publish-{uuid.uuid4().hex[:12]}"
        try:
            staging.mkdir()
            for entry in entries:
                target = staging / entry.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(version_dir / entry.name, target)
                check_file(target, {"name": entry.name, "size": entry.size, "sha256": entry.sha256}, str(staging))
            (staging / MANIFEST).write_bytes(manifest_raw)
            try:
                staging.rename(final)
            except OSError:
                if (final / MANIFEST).is_file():  # a concurrent publish of the same version won
                    return False
                raise PublishError(f"{final} exists but has no {MANIFEST}; remove it and publish again") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return True
