"""Where versions live: ``s3://bucket/prefix`` or a local directory with the same layout.

One :class:`Location` type for both, so publish, fetch and list read the same whatever the
store: keys are ``/``-joined paths relative to the location, on S3 and on disk alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bevfusion_ptq.errors import ConfigError

# S3's own rule for new buckets (3-63 chars, lower-case letters, digits, dots, hyphens).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Location:
    """An S3 bucket + key prefix (``bucket`` set) or a local directory (``path`` set)."""

    bucket: str | None = None
    prefix: str = ""
    path: Path | None = None

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    def key(self, *parts: str) -> str:
        """S3 key (or local relative path) of ``parts`` under this location."""
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def child(self, *parts: str) -> Location:
        if self.is_s3:
            return Location(bucket=self.bucket, prefix=self.key(*parts))
        assert self.path is not None
        return Location(path=self.path.joinpath(*parts))

    def display(self, *parts: str) -> str:
        """A URL or path for messages and link artifacts (never presigned, never credentials)."""
        if self.is_s3:
            return f"s3://{self.bucket}/{self.key(*parts)}".rstrip("/")
        assert self.path is not None
        return str(self.path.joinpath(*parts))

    def __str__(self) -> str:
        return self.display()


def parse_url(url: str | Path) -> Location:
    """``s3://bucket[/prefix]``, ``file:///dir`` or a plain directory path.

    Other schemes are refused rather than taken for a relative directory named ``gs:``.
    """
    text = str(url).strip()
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://"):].partition("/")
        if not _BUCKET.match(bucket):
            raise ConfigError(f"invalid S3 URL {text!r}: {bucket!r} is not a bucket name")
        segments = prefix.strip("/").split("/") if prefix.strip("/") else []
        if any(seg in ("", ".", "..") for seg in segments):
            raise ConfigError(f"invalid S3 URL {text!r}: empty or relative path segment in the prefix")
        return Location(bucket=bucket, prefix=prefix.strip("/"))
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://", text):
        raise ConfigError(f"unsupported URL {text!r}: use s3://bucket/prefix or a local directory")
    if not text:
        raise ConfigError("empty output URL")
    return Location(path=Path(text).expanduser().resolve())
