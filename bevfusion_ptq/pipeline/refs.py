"""The small descriptors stages hand each other: where an output is, its hash, what made it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from bevfusion_ptq.workdir import StageRef

__all__ = ["CheckpointRef", "DatasetRef", "FidelityRef", "SensitivityRef", "StageRef"]


class CheckpointRef(BaseModel):
    path: str
    sha256: str
    generated: bool
    source: str  # what the user named: a path, an s3:// URL, or "random" for a generated one


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


class SensitivityRef(BaseModel):
    """The sensitivity analysis on disk (``sensitivity.json``, the chart) and its proposal."""

    key: str
    path: str
    chart: str
    target: float | None
    exclude_quantizers: list[str]  # the proposal, as quantizer paths (empty without a target)
    exclude_groups: list[str]
    markdown: str
