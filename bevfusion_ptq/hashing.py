"""Content hashes: the identity of every input and output (cache keys, versions, manifests)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, streamed so multi-GB checkpoints don't need the memory."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal data always hashes equal."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def data_sha256(obj: Any) -> str:
    """Hex sha256 of JSON-able data."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()
