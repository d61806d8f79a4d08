"""The small descriptors stages hand each other: where an output is, its hash, what made it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from bevfusion_ptq.workdir import StageRef

__all__ = ["CheckpointRef", "DatasetRef", "EvaluationRef", "ExportRef", "FidelityRef", "SensitivityRef", "StageRef"]


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


class EvaluationRef(BaseModel):
    """The evaluation on disk (``evaluation.json``, results files, plots) and its headline numbers.

    ``summary`` holds ``samples``, ``version``, ``split`` and per precision (``fp32``,
    ``int8``) the devkit's ``mean_ap``, ``nd_score``, ``tp_errors`` and ``mean_dist_aps``;
    it is empty when the evaluation was switched off (``eval_samples`` 0, ``path`` None).
    """

    key: str
    path: str | None
    summary: dict[str, Any]


class SensitivityRef(BaseModel):
    """The sensitivity analysis on disk (``sensitivity.json``, the chart) and its proposal."""

    key: str
    path: str
    chart: str
    target: float | None
    exclude_quantizers: list[str]  # the proposal, as quantizer paths (empty without a target)
    exclude_groups: list[str]
    markdown: str
