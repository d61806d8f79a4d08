"""The S3 store: managed transfers with checksums, HEAD verification, conditional writes.

A version is visible only through its ``manifest.json``, written with ``IfNoneMatch="*"``
after every file has been uploaded and read back by HEAD. Until then its prefix is scratch
space: a re-publish skips objects that already hold the right bytes (recorded sha256 and
size) and overwrites the others.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from bevfusion_ptq.errors import PublishError, TransientStorageError
from bevfusion_ptq.s3.manifest import MANIFEST, MULTIPART_CHECKSUM, FileEntry, parse_manifest
from bevfusion_ptq.s3.url import Location

log = logging.getLogger(__name__)

_ABSENT = {"NoSuchKey", "404", "NotFound"}
_CONFLICT = {412, 409}  # PreconditionFailed; ConditionalRequestConflict (a concurrent write)


def _code(exc: ClientError) -> tuple[str, int]:
    resp = exc.response
    return resp.get("Error", {}).get("Code", ""), resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


class S3Store:
    def __init__(self, loc: Location, client: Any, transfer: TransferConfig, extra: dict[str, str]) -> None:
        self.loc, self.client, self.transfer, self.extra = loc, client, transfer, extra
        self.bucket = loc.bucket

    def read(self, rel: str) -> tuple[bytes, str] | None:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.loc.key(rel))
        except ClientError as exc:
            if _code(exc)[0] in _ABSENT:
                return None
            raise
        return resp["Body"].read(), resp["ETag"]

    def swap(self, rel: str, data: bytes, token: str | None) -> bool:
        cond = {"IfMatch": token} if token else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.loc.key(rel), Body=data,
                                   ContentType="application/json", ChecksumAlgorithm="SHA256",
                                   **self.extra, **cond)
        except ClientError as exc:
            code, status = _code(exc)
            # IfMatch on an object deleted meanwhile answers 404: also "changed under us".
            if status in _CONFLICT or (token and code in _ABSENT):
                return False
            raise
        return True

    def head(self, rel: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.loc.key(rel), ChecksumMode="ENABLED")
        except ClientError as exc:
            if _code(exc)[0] in _ABSENT:
                return None
            raise

    def download(self, rel: str, dest: Path) -> None:
        try:
            self.client.download_file(self.bucket, self.loc.key(rel), str(dest), Config=self.transfer)
        except ClientError as exc:
            if _code(exc)[0] in _ABSENT:
                raise FileNotFoundError(self.loc.display(rel)) from None
            raise

    def subdirs(self) -> list[str]:
        base = self.loc.key() + "/" if self.loc.key() else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base, Delimiter="/")
        return [p["Prefix"][len(base):].rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])]

    def has_any(self, rel: str) -> bool:
        resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.loc.key(rel) + "/", MaxKeys=1)
        return resp.get("KeyCount", 0) > 0

    def _upload(self, path: Path, rel: str, entry: FileEntry) -> None:
        """Managed transfer; S3 checks our SHA256 (single PUT) or full-object CRC (multipart)."""
        extra: dict[str, Any] = {**self.extra, "Metadata": {"sha256": entry.sha256}}
        if entry.size >= self.transfer.multipart_threshold:
            extra[f"Checksum{MULTIPART_CHECKSUM}"] = entry.crc_b64
        else:
            extra["ChecksumSHA256"] = entry.sha256_b64
        self.client.upload_file(str(path), self.bucket, self.loc.key(rel), ExtraArgs=extra, Config=self.transfer)

    @staticmethod
    def _mismatch(head: dict | None, entry: FileEntry) -> str | None:
        """Why the object does not hold ``entry``'s bytes, or None when it does."""
        if head is None:
            return "missing"
        if head["ContentLength"] != entry.size:
            return f"{head['ContentLength']} bytes, expected {entry.size}"
        if head.get("Metadata", {}).get("sha256") != entry.sha256:
            return "recorded sha256 differs"
        sha = head.get("ChecksumSHA256")
        if sha and "-" not in sha and sha != entry.sha256_b64:  # "-": a composite (multipart) value
            return "S3's SHA256 checksum differs"
        crc = head.get(f"Checksum{MULTIPART_CHECKSUM}")
        if crc and head.get("ChecksumType") == "FULL_OBJECT" and entry.crc and crc != entry.crc_b64:
            return f"S3's {MULTIPART_CHECKSUM} checksum differs"
        return None

    def put_version(self, version_dir: Path, rel: str, manifest_raw: bytes, entries: list[FileEntry]) -> bool:
        manifest_rel = f"{rel}/{MANIFEST}"
        if self.head(manifest_rel) is not None:
            return False
        uploaded = 0
        for entry in entries:
            if self._mismatch(self.head(f"{rel}/{entry.name}"), entry) is None:
                log.info("%s already uploaded (same sha256), skipping", self.loc.display(rel, entry.name))
                continue
            self._upload(version_dir / entry.name, f"{rel}/{entry.name}", entry)
            uploaded += 1
        for entry in entries:
            if reason := self._mismatch(self.head(f"{rel}/{entry.name}"), entry):
                where = self.loc.display(rel, entry.name)
                raise TransientStorageError(f"{where} does not read back as uploaded ({reason})")
        log.info("uploaded %d of %d files to %s; writing the manifest", uploaded, len(entries), self.loc.display(rel))
        if self.swap(manifest_rel, manifest_raw, None):
            return True
        self._check_winner(rel)
        return False

    def repair_version(self, version_dir: Path, rel: str, published: list[dict], local: dict[str, FileEntry]) -> list[str]:
        """Check every object of a published version against its manifest (size, recorded
        sha256, S3's checksums) and re-upload the intact local copy of any that differ.

        Only local bytes whose size and sha256 equal the manifest's entry are sent, and the
        upload carries that checksum, so S3 itself refuses any other bytes: a version stays
        what its manifest says. Returns the repaired file names.
        """
        repaired, beyond = [], []
        for f in published:
            entry = FileEntry(f["name"], f["size"], f["sha256"])
            where = self.loc.display(rel, entry.name)
            reason = self._mismatch(self.head(f"{rel}/{entry.name}"), entry)
            if reason is None:
                continue
            mine = local.get(entry.name)
            if mine is None or (mine.size, mine.sha256) != (entry.size, entry.sha256):
                beyond.append(f"{entry.name} ({reason})")
                continue
            log.warning("%s does not match its manifest (%s); re-uploading the intact local copy", where, reason)
            self._upload(version_dir / entry.name, f"{rel}/{entry.name}", mine)
            if again := self._mismatch(self.head(f"{rel}/{entry.name}"), entry):
                raise TransientStorageError(f"{where} does not read back as uploaded after repair ({again})")
            repaired.append(entry.name)
        if beyond:
            raise PublishError(f"{self.loc.display(rel)}: {', '.join(beyond)} differ from the published manifest and "
                               "this local copy does not hold the manifest's bytes either; fetch will refuse them")
        return repaired

    def _check_winner(self, rel: str) -> None:
        """Another publisher wrote this version's manifest first: its files must match it."""
        found = self.read(f"{rel}/{MANIFEST}")
        if found is None:
            raise TransientStorageError(f"{self.loc.display(rel)}: manifest refused as existing, then absent")
        manifest = parse_manifest(found[0], self.loc.display(rel, MANIFEST))
        for f in manifest["files"]:
            entry = FileEntry(f["name"], f["size"], f["sha256"])
            if reason := self._mismatch(self.head(f"{rel}/{f['name']}"), entry):
                raise PublishError(f"{self.loc.display(rel, f['name'])} does not match the manifest a concurrent "
                                   f"publish of the same version wrote ({reason}); fetch will refuse it")
        log.info("%s was published concurrently by another run; keeping that copy", self.loc.display(rel))
