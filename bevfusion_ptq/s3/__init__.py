"""Publishing versions to S3 (or a local directory with the same layout) and fetching them.

Layout under an output URL: ``<prefix>/<model>/<version>/`` (the files and ``manifest.json``,
written last) and ``<prefix>/<model>/latest.json``. Plain boto3 and the standard AWS
configuration; no Prefect here (``tasks/publish.py`` wraps :func:`publish_version`).

The names below are imported on first use (PEP 562): checking an ``--output`` URL with
:mod:`.url` must not cost the half second boto3 takes to import.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "make_client": "client", "transfer_config": "client",
    "download_checkpoint": "fetch", "fetch_version": "fetch", "input_summary": "fetch", "list_versions": "fetch",
    "PublishResult": "publish", "publish_version": "publish",
    "Location": "url", "parse_url": "url",
}

__all__ = [
    "Location", "PublishResult", "download_checkpoint", "fetch_version", "input_summary", "list_versions",
    "make_client", "parse_url", "publish_version", "transfer_config",
]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
