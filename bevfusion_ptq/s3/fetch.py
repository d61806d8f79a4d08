"""Consumers' side: fetch a version and verify it, list versions, download a checkpoint.

A version counts only through its manifest: without one it is unfinished and refused. Every
fetched file is checked (size, then sha256) against the manifest before the version
directory appears under the target, so a fetched directory is always a verified one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from bevfusion_ptq.errors import ConfigError, FetchError, VerificationError
from bevfusion_ptq.s3.client import make_client, transfer_config as default_transfer, translated
from bevfusion_ptq.s3.latest import read_latest
from bevfusion_ptq.s3.manifest import MANIFEST, check_file, digests, parse_manifest, safe_name
from bevfusion_ptq.s3.store import Store, open_store
from bevfusion_ptq.s3.url import Location, parse_url

log = logging.getLogger(__name__)


def _resolve(store: Store, version: str) -> tuple[str, str]:
    """(version, manifest path) for ``latest`` or an explicit version id."""
    if version != "latest":
        if "/" in version:
            raise FetchError(f"{store.loc}: refusing version id {version!r} (one path segment expected)")
        return safe_name(version, str(store.loc)), f"{version}/{MANIFEST}"
    found = read_latest(store, "")
    if found is None:
        raise FetchError(f"nothing published at {store.loc} (no latest.json; the URL must name <prefix>/<model>)")
    version = safe_name(str(found[0]["version"]), store.loc.display("latest.json"))
    if found[0]["manifest"] != f"{version}/{MANIFEST}":
        raise FetchError(f"{store.loc.display('latest.json')}: manifest {found[0]['manifest']!r} is not "
                         f"{version}/{MANIFEST}")
    return version, f"{version}/{MANIFEST}"


def _load_manifest(store: Store, version: str, rel: str) -> tuple[dict, bytes]:
    where = store.loc.display(rel)
    found = store.read(rel)
    if found is None:
        if store.has_any(version):
            raise FetchError(f"version {version} at {store.loc} is unfinished (files but no {MANIFEST}); refusing it")
        raise FetchError(f"no version {version} at {store.loc} ({where} does not exist)")
    manifest = parse_manifest(found[0], where)
    if manifest["version"] != version:
        raise FetchError(f"{where} describes version {manifest['version']!r}, not {version!r}")
    return manifest, found[0]


def _already_fetched(final: Path, raw: bytes, manifest: dict) -> bool:
    if not (final / MANIFEST).is_file() or (final / MANIFEST).read_bytes() != raw:
        return False
    try:
        for f in manifest["files"]:
            check_file(final / f["name"], f, str(final))
    except VerificationError:
        return False
    return True


def _download_all(store: Store, manifest: dict, raw: bytes, to: Path) -> Path:
    version = manifest["version"]
    final = to / version
    if _already_fetched(final, raw, manifest):
        log.info("%s already holds verified version %s", final, version)
        return final
    to.mkdir(parents=True, exist_ok=True)
    staging = to / f".{version}.fetch-{uuid.uuid4().hex[:12]}"
    try:
        for f in manifest["files"]:
            dest = staging / f["name"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                store.download(f"{version}/{f['name']}", dest)
            except FileNotFoundError:
                where = store.loc.display(version, f["name"])
                raise VerificationError(f"{where} is in the manifest but missing") from None
            check_file(dest, f, store.loc.display(version))
        (staging / MANIFEST).write_bytes(raw)
        if final.exists():
            log.warning("replacing %s, which does not match version %s's manifest", final, version)
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("fetched and verified %d files of %s into %s", len(manifest["files"]), version, final)
    return final


def fetch_version(
    url: str,
    version: str = "latest",
    to: str | Path | None = None,
    *,
    client: Any = None,
    transfer_config: TransferConfig | None = None,
) -> Path:
    """Download ``version`` (or what ``latest`` names) from ``url`` = ``<prefix>/<model>``.

    Returns ``<to>/<version>/``, verified file by file against the manifest. Refuses a
    missing or unfinished version (:class:`FetchError`) and any size or sha256 mismatch
    (:class:`VerificationError`), leaving nothing half-fetched behind.
    """
    loc = parse_url(url)
    target = Path(to if to is not None else ".").expanduser().resolve()
    with translated(f"connecting to {loc}", FetchError):
        store = open_store(loc, client=client, transfer=transfer_config)
    with translated(f"fetching {version} from {loc}", FetchError):
        version, rel = _resolve(store, version)
        manifest, raw = _load_manifest(store, version, rel)
        return _download_all(store, manifest, raw, target)


def input_summary(inputs: dict) -> str:
    """One line naming what produced a version (hash prefixes, calibration choice)."""
    calib = inputs.get("calibration") or {}
    parts = [
        f"checkpoint {str(inputs.get('checkpoint_sha256', '?'))[:12]}",
        f"config {inputs.get('config', '?')} {str(inputs.get('config_sha256', '?'))[:12]}",
        f"data {str(inputs.get('dataset_fingerprint', '?'))[:12]}",
    ]
    if calib:
        parts.append(f"calib {calib.get('method', '?')} x{calib.get('batches', '?')}")
    return ", ".join(parts)


def list_versions(url: str, *, client: Any = None) -> list[dict]:
    """Versions under ``<prefix>/<model>``, oldest first; unfinished ones last, marked so."""
    loc = parse_url(url)
    with translated(f"listing {loc}", FetchError):
        store = open_store(loc, client=client)
        latest = read_latest(store, "")
        latest_version = latest[0]["version"] if latest else None
        rows = []
        for name in store.subdirs():
            found = store.read(f"{name}/{MANIFEST}")
            if found is None:
                rows.append({"version": name, "complete": False, "created_at": None, "latest": False})
                continue
            m = parse_manifest(found[0], loc.display(name, MANIFEST))
            inputs = m.get("inputs") or {}
            rows.append({
                "version": m["version"], "complete": True, "created_at": m["created_at"],
                "latest": m["version"] == latest_version, "files": len(m["files"]),
                "size": sum(f["size"] for f in m["files"]), "inputs": inputs, "summary": input_summary(inputs),
                "package_version": m.get("package_version"), "git_commit": m.get("git_commit"),
                "fidelity": m.get("fidelity"),
            })
    return sorted(rows, key=lambda r: (not r["complete"], r["created_at"] or "", r["version"]))


def download_checkpoint(url: str, dest_dir: str | Path, *, client: Any = None,
                        transfer_config: TransferConfig | None = None) -> Path:
    """``s3://bucket/key`` to ``<dest_dir>/<bucket>/<key>``; reused while its ETag and size hold.

    A sidecar ``.<name>.s3.json`` records the ETag and size of the copy. Objects we published
    carry their sha256 in metadata, and that is checked too.
    """
    loc = parse_url(url)
    if not loc.is_s3 or not loc.key():
        raise ConfigError(f"download_checkpoint needs s3://bucket/key, got {url!r}")
    dest = Path(dest_dir).resolve() / loc.bucket / loc.key()
    sidecar = dest.with_name(f".{dest.name}.s3.json")
    with translated(f"downloading {loc}", FetchError):
        client = client or make_client()
        head = _head_object(client, loc)
        stamp = {"url": str(loc), "etag": head["ETag"], "size": head["ContentLength"]}
        if dest.is_file() and sidecar.is_file() and dest.stat().st_size == stamp["size"]:
            if json.loads(sidecar.read_text()) == stamp:
                log.info("%s unchanged (same ETag); reusing %s", loc, dest)
                return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}")
        try:
            client.download_file(loc.bucket, loc.key(), str(tmp), Config=transfer_config or default_transfer())
            size, sha, _ = digests(tmp)
            want = head.get("Metadata", {}).get("sha256")
            if size != stamp["size"] or (want and want != sha):
                raise VerificationError(f"{loc}: downloaded copy differs from the object (size or sha256)")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        sidecar.write_text(json.dumps(stamp))
    log.info("downloaded %s to %s", loc, dest)
    return dest


def remote_identity(url: str, *, client: Any = None) -> dict[str, Any]:
    """ETag and size of ``s3://bucket/key`` by one HEAD request: a cache key for a remote file
    that does not need downloading it first."""
    loc = parse_url(url)
    if not loc.is_s3 or not loc.key():
        raise ConfigError(f"expected s3://bucket/key, got {url!r}")
    with translated(f"reading {loc}", FetchError):
        head = _head_object(client or make_client(), loc)
    return {"etag": head["ETag"], "size": head["ContentLength"]}


def _head_object(client: Any, loc: Location) -> dict[str, Any]:
    try:
        return client.head_object(Bucket=loc.bucket, Key=loc.key())
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
            raise FetchError(f"no object at {loc}") from None
        raise
