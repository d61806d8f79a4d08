"""The one-box set-up (`bevfusion-ptq serve`) and the Prefect UI, in a real headless Chromium.

A server and `bevfusion-ptq serve` for the module: the served deployments carry the
prefect.yaml settings but no pool, a run completes with no worker, and the UI's page for
`ptq-on-demand` renders the run form with PTQParams' fields. Debian's chromium is installed
by the set-up when missing (these machines run as root; apt reaches Debian's mirror).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bevfusion_ptq.params import PTQParams
from tests.data_helpers import generated_tree
from tests.prefect_server import Server, client_settings, prefect_server, tail, wait_for_run

pytestmark = pytest.mark.slow

BEVFUSION_PTQ = str(Path(sys.executable).parent / "bevfusion-ptq")
NOTES_SHOT = Path("/work/notes/ui-screenshot.png")
# The env notes' flags: without the background-networking ones Chromium keeps dialling out
# into a closed network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.fail("Debian's chromium is missing and only root can apt-get install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return shutil.which("chromium") or pytest.fail("apt-get installed chromium but it is not on PATH")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data: dict = {}
    with prefect_server(root, meanwhile=lambda s: data.setdefault("root", generated_tree(tmp_path_factory))) as server:
        serve = server.spawn("serve", BEVFUSION_PTQ, "serve", "--limit", "1")
        with client_settings(server):
            _wait_for_deployments(server, serve)
            yield server, data["root"]


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _wait_for_deployments(server: Server, serve: subprocess.Popen, timeout: float = 180) -> None:
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with _client() as client:
        while time.monotonic() < deadline:
            assert serve.poll() is None, tail(server.root / "serve.log")
            try:
                client.read_deployment_by_name("bevfusion-ptq/ptq-on-demand")
                client.read_deployment_by_name("bevfusion-ptq/ptq-scheduled")
                return
            except ObjectNotFound:
                time.sleep(1)
    raise TimeoutError(tail(server.root / "serve.log"))


def test_serve_registers_the_files_deployments_without_a_pool(served):
    server, _ = served
    with _client() as client:
        sched = client.read_deployment_by_name("bevfusion-ptq/ptq-scheduled")
        ondemand = client.read_deployment_by_name("bevfusion-ptq/ptq-on-demand")
        assert sched.work_pool_name is None and ondemand.work_pool_name is None
        [schedule] = sched.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
        assert ondemand.schedules == []
        assert (sched.global_concurrency_limit.limit, ondemand.global_concurrency_limit.limit) == (1, 4)
        assert sched.enforce_parameter_schema and ondemand.enforce_parameter_schema
        [automation] = client.read_resource_related_automations(f"prefect.deployment.{ondemand.id}")
        assert automation.trigger.expect == {"bevfusion.checkpoint.created"}


def test_served_run_completes_with_no_worker(served):
    server, data_root = served
    out = server.root / "out"
    sent = {"params": PTQParams(data_root=str(data_root), calib_batches=1, calib_method="max",
                                output=str(out), device="cpu", eval_samples=1).model_dump(mode="json")}
    with _client() as client:
        dep = client.read_deployment_by_name("bevfusion-ptq/ptq-on-demand")
        run = wait_for_run(client, client.create_flow_run_from_deployment(dep.id, parameters=sent).id,
                           logs=[server.root / "serve.log"])
    assert run.state.type.value == "COMPLETED", tail(server.root / "serve.log")
    assert run.parameters == sent
    assert list((out / "bevfusion-tiny").glob("*/manifest.json"))


def _browse(chromium: str, url: str, profile: Path, *extra: str) -> str:
    proc = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000", *extra, url],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _text(dom: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def test_ui_shows_the_on_demand_deployment_and_its_run_form(served, chromium, tmp_path):
    server, _ = served
    with _client() as client:
        dep = client.read_deployment_by_name("bevfusion-ptq/ptq-on-demand")
    page = f"{server.url}/deployments/deployment/{dep.id}"
    form = page + "/run"
    fields = PTQParams.model_json_schema()["properties"]
    expected = ["ptq-on-demand", "bevfusion-ptq", "params"] + [f["title"] for f in fields.values()] \
        + [f["description"] for f in fields.values()] + ["mse", "percentile", "entropy", "max"]

    text = ""
    for attempt in range(3):  # the single-page app renders after its API calls return
        text = _text(_browse(chromium, form, tmp_path / f"profile-{attempt}", "--dump-dom"))
        if all(e in text for e in expected):
            break
    missing = [e for e in expected if e not in text]
    assert not missing, f"not in the run form: {missing}\n{text[:3000]}"
    assert "ptq-on-demand" in _text(_browse(chromium, page, tmp_path / "profile-page", "--dump-dom"))

    shot = tmp_path / "ui-ptq-on-demand-run.png"
    _browse(chromium, form, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1400,1800", "--hide-scrollbars")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if NOTES_SHOT.parent.is_dir():  # the session's notes folder, where the lead looks
        shutil.copyfile(shot, NOTES_SHOT)
