"""The re-run fast path: a run whose version is already published computes nothing.

Unit checks of the identity (what invalidates it and what does not), then the CLI as a user
runs it: a re-run answers in one line without importing torch or starting Prefect, and with
a Prefect API configured it is still recorded there as a Completed flow run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.rerun import find_published, remember

REPO = Path(__file__).resolve().parents[1]


def _published(tmp_path: Path) -> tuple[PTQParams, Path]:
    """Params with a real checkpoint file, and a version directory recorded as their result."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    ckpt = tmp_path / "ckpt.pth"
    ckpt.write_bytes(b"weights")
    params = PTQParams(checkpoint=str(ckpt), output=str(tmp_path / "out"), calib_batches=2, device="cpu")
    version = tmp_path / "out" / "bevfusion-tiny" / "0123456789abcdef"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text(json.dumps({"version": version.name, "model": "bevfusion-tiny"}))
    remember(params, {"url": str(version), "path": str(version), "version": version.name, "flow_run_id": "f1"})
    return params, version


def test_found_again_for_the_same_inputs_only(tmp_path):
    params, version = _published(tmp_path)
    found = find_published(params)
    assert found is not None and (found["url"], found["version"]) == (str(version), version.name)
    # How a run happens does not change what it produces.
    assert find_published(params.model_copy(update={"device": "cuda", "calib_checkpoint_every": 5})) is not None
    # What it computes does.
    assert find_published(params.model_copy(update={"calib_batches": 3})) is None
    assert find_published(params.model_copy(update={"exclude": ["fuser"]})) is None
    assert find_published(params.model_copy(update={"output": str(tmp_path / "elsewhere")})) is None


def test_a_changed_checkpoint_or_a_deleted_version_is_not_reused(tmp_path):
    params, version = _published(tmp_path)
    ckpt = Path(params.checkpoint)
    ckpt.write_bytes(b"other weights")
    os.utime(ckpt, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert find_published(params) is None

    params, version = _published(tmp_path / "again")
    (version / "manifest.json").unlink()
    assert find_published(params) is None


def _cli(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    probe = ("import sys; from flows.cli import main; code = main(sys.argv[1:]); "
             "print('HEAVY', sorted(m for m in ('torch', 'mmdet', 'spconv') if m in sys.modules), file=sys.stderr); "
             "sys.exit(code)")
    return subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def _env(state: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PYTHONPATH": str(REPO), "BEVFUSION_PTQ_HOME": str(state), **extra}


def test_cli_rerun_says_nothing_was_recomputed_without_torch_or_prefect(tmp_path, isolated_state):
    params, version = _published(tmp_path)
    args = ["run", "--checkpoint", params.checkpoint, "--output", params.output, "--calib-batches", "2"]
    proc = _cli(tmp_path, *args, env=_env(isolated_state))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"already published at {version}, nothing recomputed (version {version.name})"
    assert "HEAVY []" in proc.stderr
    assert not (isolated_state / "prefect").exists()  # no temporary Prefect server was started

    as_json = _cli(tmp_path, *args, "--json", env=_env(isolated_state))
    result = json.loads(as_json.stdout)
    assert (result["url"], result["recomputed"], result["flow_run_id"]) == (str(version), [], None)


@pytest.mark.slow
def test_cli_rerun_is_recorded_as_a_flow_run_when_an_api_is_configured(tmp_path, isolated_state):
    from tests.prefect_server import client_settings, prefect_server

    params, version = _published(tmp_path)
    with prefect_server(tmp_path / "server") as server:
        env = {**server.env, "PYTHONPATH": str(REPO), "BEVFUSION_PTQ_HOME": str(isolated_state)}
        proc = _cli(tmp_path, "run", "--checkpoint", params.checkpoint, "--output", params.output,
                    "--calib-batches", "2", "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        run_id = json.loads(proc.stdout)["flow_run_id"]
        with client_settings(server):
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                run = client.read_flow_run(run_id)
                flow = client.read_flow(run.flow_id)
                artifacts = client.read_artifacts()
    assert flow.name == "bevfusion-ptq" and run.state.type.value == "COMPLETED"
    assert "nothing recomputed" in run.state.message
    assert run.parameters["params"]["calib_batches"] == 2
    assert any(a.flow_run_id == run.id and str(version) in a.data for a in artifacts)
