"""Shared fixtures. Every test gets its own state directory, so runs never share files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_state(tmp_path, monkeypatch):
    """Project-local state (work files, generated data, random checkpoints) per test."""
    home = tmp_path / "state"
    monkeypatch.setenv("BEVFUSION_PTQ_HOME", str(home))
    return home


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests skip cleanly (and visibly) on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
