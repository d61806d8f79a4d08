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


@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect server (its own database), started and stopped around the module."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    """One state directory for a module's flow runs, so later runs find earlier runs' cache."""
    return tmp_path_factory.mktemp("ptq-home")


@pytest.fixture
def home(shared_home, monkeypatch):
    monkeypatch.setenv("BEVFUSION_PTQ_HOME", str(shared_home))
    return shared_home
