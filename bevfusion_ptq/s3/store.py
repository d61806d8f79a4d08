"""The few operations publish, fetch and list need, for S3 and for a local directory.

Both stores expose the same small surface, so the rules that matter (manifest last,
``latest`` moved forward only by compare-and-swap, verify every file) are written once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from boto3.s3.transfer import TransferConfig

from bevfusion_ptq.errors import ConfigError
from bevfusion_ptq.s3.manifest import FileEntry
from bevfusion_ptq.s3.url import Location

log = logging.getLogger(__name__)

SSE_MODES = ("AES256", "aws:kms")


class Store(Protocol):
    """Paths (``rel``) are ``/``-joined and relative to :attr:`loc`."""

    loc: Location

    def read(self, rel: str) -> tuple[bytes, str] | None:
        """Content and a change token (ETag), or None when absent."""

    def swap(self, rel: str, data: bytes, token: str | None) -> bool:
        """Write ``data`` only if the current token is ``token`` (None: only if absent)."""

    def download(self, rel: str, dest: Path) -> None: ...

    def subdirs(self) -> list[str]:
        """Names of the directories (key prefixes) directly under :attr:`loc`."""

    def has_any(self, rel: str) -> bool:
        """Whether anything exists under directory ``rel``."""

    def put_version(self, version_dir: Path, rel: str, manifest_raw: bytes, entries: list[FileEntry]) -> bool:
        """Copy a verified version in, manifest last; False if it was already there."""

    def repair_version(self, version_dir: Path, rel: str, published: list[dict], local: dict[str, FileEntry]) -> list[str]:
        """Restore published files that differ from the published manifest from intact local
        ones (``local``: verified entries by name); the names restored."""


def sse_args(sse: str | None, kms_key_id: str | None) -> dict[str, str]:
    """PutObject/upload arguments for SSE-S3 (``AES256``) or SSE-KMS (``aws:kms`` + optional key)."""
    if sse is None:
        if kms_key_id:
            raise ConfigError("a KMS key id needs sse='aws:kms'")
        return {}
    if sse not in SSE_MODES:
        raise ConfigError(f"unknown server-side encryption {sse!r}: use one of {', '.join(SSE_MODES)}")
    if kms_key_id and sse != "aws:kms":
        raise ConfigError("a KMS key id needs sse='aws:kms'")
    args = {"ServerSideEncryption": sse}
    if kms_key_id:
        args["SSEKMSKeyId"] = kms_key_id
    return args


def open_store(
    loc: Location,
    *,
    client: Any = None,
    transfer: TransferConfig | None = None,
    sse: str | None = None,
    kms_key_id: str | None = None,
) -> Store:
    """The store for ``loc``; an S3 client is made from the AWS environment unless given."""
    extra = sse_args(sse, kms_key_id)
    if not loc.is_s3:
        from bevfusion_ptq.s3.localstore import LocalStore

        if extra:
            log.warning("server-side encryption applies to S3 only; ignored for %s", loc)
        return LocalStore(loc)
    from bevfusion_ptq.s3.client import make_client, transfer_config
    from bevfusion_ptq.s3.s3store import S3Store

    return S3Store(loc, client or make_client(), transfer or transfer_config(), extra)
