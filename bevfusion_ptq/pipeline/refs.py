"""The small descriptors stages hand each other: where an output is, its hash, what made it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from bevfusion_ptq.workdir import StageRef

__all__ = ["CheckpointRef", "DatasetRef", "ExportRef", "FidelityRef", "StageRef"]


class CheckpointRef(BaseModel):
    path: str
    sha256: str
    generated: bool
    source: str  # what the user named: a path, an s3:// URL, "random" for a generated one, or "embedded:<file>"


class DatasetRef(BaseModel):
    """Which calibration samples, identified by a fingerprint of the data and the choice."""

    data_root: str
    info_path: str
    tokens: list[str]
    fingerprint: str
    generated: bool


class FidelityRef(BaseModel):
    """The fidelity report on disk (``fidelity.json``), its headline numbers and markdown."""

    key: str
    path: str | None  # None when the report was switched off (fidelity_batches 0)
    summary: dict[str, Any]
    markdown: str


class ExportRef(BaseModel):
    """The exported deployment files (``onnx_<precision>/``, ``deploy.md``) in the work directory."""

    key: str
    path: str | None  # None when export was switched off (--export none)
    files: list[dict[str, Any]]  # per file: name, precision, relative path, size, nodes, Q/DQ counts
