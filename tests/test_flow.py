"""The PTQ flow end to end on bevfusion-tiny with generated data, against a real Prefect API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prefect.testing.utilities import prefect_test_harness

from bevfusion_ptq.hashing import file_sha256
from bevfusion_ptq.params import PTQParams

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect server (its own database), started and stopped around the module."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _check_version_dir(version_dir: Path) -> dict:
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert {"version", "model", "created_at", "files"} <= manifest.keys()
    names = {f["name"] for f in manifest["files"]}
    assert {"model.pth", "state_dict.pth", "quantizers.json"} <= names
    on_disk = {p.name for p in version_dir.iterdir()} - {"manifest.json"}
    assert names == on_disk
    for entry in manifest["files"]:
        path = version_dir / entry["name"]
        assert path.stat().st_size == entry["size"]
        assert file_sha256(path) == entry["sha256"]
    quantizers = json.loads((version_dir / "quantizers.json").read_text())
    enabled = [q for q in quantizers if q["enabled"]]
    assert enabled, "no enabled quantizer"
    for q in enabled:
        values = q["amax"] if isinstance(q["amax"], list) else [q["amax"]]
        assert values and all(v is not None and 0 < v < float("inf") for v in values), q["name"]
    return manifest


def test_flow_runs_every_stage_and_writes_verified_artifacts(prefect_api, tmp_path):
    from flows.ptq import ptq

    params = PTQParams(output=str(tmp_path / "out"), calib_batches=2, device="cpu")
    result = ptq(params)
    version_dir = Path(result["path"])
    assert version_dir.parent.parent == tmp_path / "out"
    assert version_dir.parent.name == "bevfusion-tiny"
    manifest = _check_version_dir(version_dir)
    assert manifest["version"] == result["version"] == version_dir.name

    # The reference-compatible pickle and the portable state dict both load.
    exported = torch.load(version_dir / "model.pth", weights_only=False)
    state = torch.load(version_dir / "state_dict.pth", weights_only=True)
    assert set(exported.module.state_dict()) == set(state)
    assert any(k.endswith("_input_quantizer._amax") for k in state)

    # Same inputs, same version: the second run reuses the complete directory.
    again = ptq(params)
    assert again["version"] == result["version"] and again["reused"]


def test_cli_run_with_embedded_defaults(tmp_path):
    """The README's main command, as a user runs it (ephemeral local Prefect API)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["BEVFUSION_PTQ_HOME"] = str(tmp_path / "state")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--output", str(tmp_path / "artifacts"), "--calib-batches", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "artifacts written to" in proc.stdout
    versions = list((tmp_path / "artifacts" / "bevfusion-tiny").iterdir())
    assert len(versions) == 1
    _check_version_dir(versions[0])
    # Prefect state stayed under our state directory, not in ~/.prefect.
    assert (tmp_path / "state" / "prefect").is_dir()


def test_cli_bad_parameter_fails_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--calib-batches", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 3
    assert "--calib-batches" in proc.stderr and "greater than or equal to 1" in proc.stderr
