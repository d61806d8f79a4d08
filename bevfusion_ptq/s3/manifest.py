"""Reading and checking manifests, and the ``latest.json`` record built from one.

The manifest's sha256 list is the source of truth on both ends: files are checked against
it before upload and after download. Names come from a possibly foreign manifest, so they
are validated before they are joined to a local path.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.httpchecksum import HAS_CRT

from bevfusion_ptq.errors import FetchError, PublishError, VerificationError

if HAS_CRT:  # botocore computes CRC32C only through awscrt
    from awscrt.checksums import crc32c as _multipart_crc
else:
    _multipart_crc = zlib.crc32

# Full-object checksum sent with multipart uploads (S3 only has composite SHA256 for those).
MULTIPART_CHECKSUM = "CRC32C" if HAS_CRT else "CRC32"
MANIFEST = "manifest.json"
LATEST = "latest.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """One manifest file, plus the MULTIPART_CHECKSUM of the local copy (multipart uploads send it)."""

    name: str
    size: int
    sha256: str
    crc: int = 0

    @property
    def sha256_b64(self) -> str:
        return base64.b64encode(bytes.fromhex(self.sha256)).decode()

    @property
    def crc_b64(self) -> str:
        return base64.b64encode(self.crc.to_bytes(4, "big")).decode()


def digests(path: Path) -> tuple[int, str, int]:
    """Size, sha256 hex and MULTIPART_CHECKSUM of a file in one streamed pass."""
    sha, crc, size = hashlib.sha256(), 0, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            crc = _multipart_crc(chunk, crc)
            size += len(chunk)
    return size, sha.hexdigest(), crc


def safe_name(name: Any, where: str) -> str:
    """A relative POSIX path without ``..``; anything else could write outside the target."""
    path = PurePosixPath(str(name))
    if (not isinstance(name, str) or not name or path.is_absolute() or "\\" in name
            or any(p in ("", ".", "..") for p in name.split("/")) or name == MANIFEST):
        raise FetchError(f"{where}: refusing file name {name!r} (not a plain relative path)")
    return name


def parse_manifest(data: bytes, where: str) -> dict:
    """A manifest's JSON, checked for the fields every consumer relies on."""
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise FetchError(f"{where}: not valid JSON ({exc})") from None
    missing = {"version", "model", "created_at", "files"} - set(manifest if isinstance(manifest, dict) else ())
    if missing:
        raise FetchError(f"{where}: not a bevfusion-ptq manifest (missing {', '.join(sorted(missing))})")
    names = [safe_name(f.get("name"), where) for f in manifest["files"]]
    if len(set(names)) != len(names):
        raise FetchError(f"{where}: duplicate file names")
    for f in manifest["files"]:
        if not isinstance(f.get("size"), int) or not isinstance(f.get("sha256"), str):
            raise FetchError(f"{where}: file {f['name']!r} lacks an integer size or a sha256")
    created_at(manifest, where)
    return manifest


def created_at(record: dict, where: str) -> dt.datetime:
    """``created_at`` as an aware datetime, so ordering never depends on string formats."""
    try:
        when = dt.datetime.fromisoformat(str(record["created_at"]))
    except (KeyError, ValueError):
        raise FetchError(f"{where}: missing or unreadable created_at") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def check_file(path: Path, entry: dict, where: str) -> FileEntry:
    """Size, then sha256, of ``path`` against its manifest entry."""
    if not path.is_file():
        raise VerificationError(f"{where}: {entry['name']} is missing")
    size = path.stat().st_size
    if size != entry["size"]:
        raise VerificationError(f"{where}: {entry['name']} has {size} bytes, the manifest says {entry['size']}")
    _, sha, crc = digests(path)
    if sha != entry["sha256"]:
        raise VerificationError(f"{where}: {entry['name']} sha256 {sha[:16]}... differs from the manifest's "
                                f"{entry['sha256'][:16]}...")
    return FileEntry(entry["name"], size, sha, crc)


def load_local_version(version_dir: Path) -> tuple[dict, bytes, list[FileEntry]]:
    """A local version directory's manifest (parsed and raw) and its files, all verified.

    The directory name must be the manifest's version: versions are derived from the inputs,
    and the name is what makes re-publishing the same directory a no-op.
    """
    where = str(version_dir)
    raw_path = version_dir / MANIFEST
    if not raw_path.is_file():
        raise PublishError(f"{where} is not a finished version directory (no {MANIFEST})")
    raw = raw_path.read_bytes()
    try:
        manifest = parse_manifest(raw, str(raw_path))
    except FetchError as exc:
        raise PublishError(str(exc)) from None
    if "/" in str(manifest["model"]) or str(manifest["model"]) in ("", ".", ".."):
        raise PublishError(f"{where}: model name {manifest['model']!r} is not a single path segment")
    if manifest["version"] != version_dir.name:
        raise PublishError(f"{where}: directory name differs from the manifest's version {manifest['version']!r}")
    entries = [check_file(version_dir / f["name"], f, where) for f in manifest["files"]]
    return manifest, raw, entries


def latest_record(manifest: dict) -> dict:
    """``latest.json``: the version, its manifest key relative to ``<prefix>/<model>/``, and when."""
    return {
        "model": manifest["model"],
        "version": manifest["version"],
        "manifest": f"{manifest['version']}/{MANIFEST}",
        "created_at": manifest["created_at"],
    }
