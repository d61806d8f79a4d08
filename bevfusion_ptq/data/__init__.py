"""Calibration data: nuScenes info files in, batches of the shared contract out.

Entry points:
- :func:`build_calibration_set`: choose keyframes, fingerprint them, serve a ``DataLoader``;
- :func:`move_batch`, :func:`random_batch`: batch helpers for the calibration loop and tests;
- :func:`make_dataset`: write a small synthetic tree in the nuScenes layout.

``make_dataset`` needs OpenCV; it is imported on first use so loading data never does.
"""

from __future__ import annotations

from typing import Any

from bevfusion_ptq.data.batch import collate, move_batch, random_batch
from bevfusion_ptq.data.calibration_set import CalibrationSet, build_calibration_set
from bevfusion_ptq.data.infos import SampleRecord, read_info_file
from bevfusion_ptq.data.settings import DataSettings

__all__ = [
    "CalibrationSet",
    "DataSettings",
    "GeneratedDataset",
    "SampleRecord",
    "build_calibration_set",
    "collate",
    "make_dataset",
    "move_batch",
    "random_batch",
    "read_info_file",
]


def __getattr__(name: str) -> Any:
    """Lazy ``make_dataset``: the generator imports OpenCV, which data loading never needs."""
    if name in ("make_dataset", "GeneratedDataset"):
        from bevfusion_ptq.data import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
