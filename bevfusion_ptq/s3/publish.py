"""Publish a finished local version directory like a release.

Order, so a consumer never sees a half version: check the local files against their
manifest; upload every file (managed transfer, checksummed) and read each back by HEAD;
write the manifest only then, and only if absent; finally move ``latest`` forward by
compare-and-swap. Publishing a version that is already there writes nothing, except to
repair it: each published object is checked against the published manifest, and one that
differs is replaced by the intact local copy (only bytes that match the manifest).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

from bevfusion_ptq.errors import PTQError
from bevfusion_ptq.s3.client import translated
from bevfusion_ptq.s3.latest import advance_latest
from bevfusion_ptq.s3.manifest import MANIFEST, latest_record, load_local_version, parse_manifest
from bevfusion_ptq.s3.store import Store, open_store
from bevfusion_ptq.s3.url import parse_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishResult:
    """Where the version went. ``reused``: the destination already had it, nothing was written.

    ``url`` is the version's own location (``s3://bucket/prefix/<model>/<version>`` or a
    local path), never a presigned URL. A version published in place (a local output that
    ``save_artifacts`` wrote directly) is not ``reused``.
    """

    url: str
    version: str
    model: str
    manifest_key: str
    reused: bool
    latest_updated: bool
    repaired: tuple[str, ...] = ()
    """Files of an already published version that differed from its manifest and were
    restored from the intact local copy."""


def _check_published(store: Store, version_dir: Path, rel: str, manifest: dict, entries: list) -> list[str]:
    """An already published version: repair objects that differ from its manifest.

    Same version id with other file hashes (a non-deterministic rebuild) only warns: the
    published copy stays, and only local files that hold the published manifest's bytes may
    replace damaged objects.
    """
    manifest_rel = f"{rel}/{MANIFEST}"
    found = store.read(manifest_rel)
    if found is None:
        return []
    published = parse_manifest(found[0], store.loc.display(manifest_rel))
    if published["files"] != manifest["files"]:
        log.warning("%s was already published with other file hashes; versions are immutable, so the "
                    "published copy stays and this local one is not uploaded", store.loc.display(manifest_rel))
    return store.repair_version(version_dir, rel, published["files"], {e.name: e for e in entries})


def publish_version(
    version_dir: str | Path,
    url: str,
    *,
    sse: str | None = None,
    kms_key_id: str | None = None,
    transfer_config: TransferConfig | None = None,
    client: Any = None,
) -> PublishResult:
    """Publish ``version_dir`` (``<...>/<version>/`` with its manifest) under ``url``.

    The layout is ``<url>/<model>/<version>/`` plus ``<url>/<model>/latest.json``. On any
    failure the local directory is left untouched and the error says how to retry.
    """
    version_dir = Path(version_dir).resolve()
    manifest, raw, entries = load_local_version(version_dir)
    model, version = manifest["model"], manifest["version"]
    loc = parse_url(url)
    target = loc.display(model, version)
    with translated(f"connecting to {loc}"):
        store = open_store(loc, client=client, transfer=transfer_config, sse=sse, kms_key_id=kms_key_id)
    try:
        with translated(f"publishing {version} to {target}"):
            written = store.put_version(version_dir, f"{model}/{version}", raw, entries)
            repaired = [] if written else _check_published(store, version_dir, f"{model}/{version}", manifest, entries)
            moved = advance_latest(store, model, latest_record(manifest))
    except PTQError as exc:
        raise type(exc)(f"{exc}. The local version directory {version_dir} is intact; publish it later "
                        f"with: bevfusion-ptq publish {version_dir} {url}") from exc
    reused = not written
    log.info("%s %s (%d files)%s", "already published:" if reused else "published", target, len(entries),
             "; latest moved" if moved else "")
    key = loc.key(model, version, MANIFEST) if loc.is_s3 else loc.display(model, version, MANIFEST)
    return PublishResult(url=target, version=version, model=model, manifest_key=key, reused=reused,
                         latest_updated=moved, repaired=tuple(repaired))
