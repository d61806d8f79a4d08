"""deployments/prefect.yaml against a real Prefect server, workers and flow runs.

One server, pool and pair of GPU-pinned workers for the module, set up with the README's
commands ("Run it on your GPU hosts"). Three flow runs in all: one on-demand run through the
API as the UI sends it, then an event-triggered run and a CLI-triggered run at the same
time, whose calibrate stages must take turns on the `gpu` tag limit of 1.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from prefect.workers.base import BaseJobConfiguration

from bevfusion_ptq.params import PTQParams
from tests.data_helpers import generated_tree
from tests.prefect_server import PREFECT, REPO, Server, client_settings, prefect_server, tail, wait_for_run

pytestmark = pytest.mark.slow

POOL = "bevfusion-gpu"
YAML = "deployments/prefect.yaml"
BEVFUSION_PTQ = str(Path(sys.executable).parent / "bevfusion-ptq")
STAGES = {"prepare-checkpoint", "build-dataset", "load-model", "insert-quantizers", "fuse-bn", "collect-statistics", "compute-amax", "save-artifacts"}


@dataclass
class Stack:
    server: Server
    checkpoint: Path
    data_root: Path
    workers: subprocess.Popen
    workers_log: Path

    def params(self, out: str, **kw) -> dict:
        """Non-default parameters, complete, as the UI's run form sends them."""
        p = PTQParams(config="bevfusion-tiny", checkpoint=str(self.checkpoint), data_root=str(self.data_root),
                      calib_batches=2, calib_method="max", output=str(self.server.root / out), device="cpu",
                      **{"eval_samples": 1, **kw})
        return {"params": p.model_dump(mode="json")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    ckpt = root / "ckpt" / "bevfusion-tiny.pth"
    made: dict = {}

    def inputs(server: Server) -> None:  # while the server boots
        made["ckpt"] = subprocess.Popen([BEVFUSION_PTQ, "make-checkpoint", str(ckpt), "--config", "bevfusion-tiny"],
                                        env=server.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        made["data"] = generated_tree(tmp_path_factory)

    with prefect_server(root, meanwhile=inputs) as server:
        assert made["ckpt"].wait(300) == 0, made["ckpt"].stdout.read()
        # The README's set-up, command for command.
        server.run_all([PREFECT, "work-pool", "create", POOL, "--type", "process"],
                       [PREFECT, "concurrency-limit", "create", "gpu", "1"])
        server.run_all([PREFECT, "work-pool", "set-concurrency-limit", POOL, "2"],
                       [PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", YAML])
        workers = server.spawn("workers", "bash", "deployments/gpu-workers.sh", "--gpus", "0,1", "--grace", "1")
        stack = Stack(server, ckpt, made["data"], workers, server.root / "workers.log")
        with client_settings(server):
            _wait_for_workers(2, stack.workers_log)
            yield stack


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _online_workers(client) -> list:
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    return client.read_workers_for_work_pool(POOL, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])))


def _wait_for_workers(n: int, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with _client() as client:
        while time.monotonic() < deadline:
            if len(_online_workers(client)) >= n:
                return
            time.sleep(1)
    raise TimeoutError(f"{n} workers not online:\n{tail(log)}")


def _deployment(client, name: str):
    return client.read_deployment_by_name(f"bevfusion-ptq/{name}")


def _runs_of(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def _task_runs(client, flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _check_completed(client, run, stack: Stack, sent: dict) -> Path:
    """Completed, with exactly the parameters sent, every stage done, a verified version on disk."""
    assert run.state.type.value == "COMPLETED", f"{run.state}\n{tail(stack.workers_log)}"
    assert run.parameters == sent
    tasks = {t.name.rsplit("-", 1)[0]: t for t in _task_runs(client, run.id)}
    assert STAGES <= set(tasks), sorted(tasks)
    assert all(t.state.type.value == "COMPLETED" for t in tasks.values())
    assert "gpu" in tasks["collect-statistics"].tags and "gpu" not in tasks["build-dataset"].tags
    versions = list((Path(sent["params"]["output"]) / "bevfusion-tiny").glob("*/manifest.json"))
    assert len(versions) == 1, versions
    manifest = json.loads(versions[0].read_text())
    for entry in manifest["files"]:
        assert (versions[0].parent / entry["name"]).stat().st_size == entry["size"]
    return versions[0].parent


def test_deploy_all_registers_both_deployments_with_the_files_settings(stack):
    with _client() as client:
        sched, ondemand = _deployment(client, "ptq-scheduled"), _deployment(client, "ptq-on-demand")
        for dep, queue in ((sched, "scheduled"), (ondemand, "on-demand")):
            assert dep.entrypoint == "flows/ptq.py:ptq"
            assert (dep.work_pool_name, dep.work_queue_name) == (POOL, queue)
            assert dep.enforce_parameter_schema
            assert {"bevfusion", "ptq"} <= set(dep.tags) and "gpu" not in dep.tags
            assert dep.pull_steps == yaml.safe_load((REPO / YAML).read_text())["pull"]  # templated on the worker
            schema = dep.parameter_openapi_schema
            assert "params" not in schema.get("required", [])  # PTQParams() is the default
            assert set(PTQParams.model_fields) == set(schema["definitions"]["PTQParams"]["properties"])
        assert (sched.global_concurrency_limit.limit, ondemand.global_concurrency_limit.limit) == (1, 4)
        assert sched.concurrency_options.collision_strategy.value == "ENQUEUE"
        [schedule] = sched.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "Europe/Berlin", True)
        assert ondemand.schedules == []
        [automation] = client.read_resource_related_automations(f"prefect.deployment.{ondemand.id}")
        assert automation.trigger.expect == {"bevfusion.checkpoint.created"}
        assert automation.actions[0].deployment_id == ondemand.id


def _environ_of_children(pid: int) -> list[dict[str, str]]:
    """Environments of the processes whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            raw = (stat.parent / "environ").read_bytes()
        except (OSError, ValueError):
            continue
        out.append(dict(e.split("=", 1) for e in raw.decode(errors="replace").split("\0") if "=" in e))
    return out


def test_gpu_workers_script_starts_one_pinned_worker_per_gpu(stack):
    pinned = sorted(env.get("CUDA_VISIBLE_DEVICES") for env in _environ_of_children(stack.workers.pid))
    assert pinned == ["0", "1"]
    with _client() as client:
        assert sorted(w.name for w in _online_workers(client)) == [f"{socket.gethostname()}-gpu0", f"{socket.gethostname()}-gpu1"]
        assert client.read_work_pool(POOL).concurrency_limit == 2


def test_schedule_creates_upcoming_runs_at_the_cron_times(stack):
    berlin = ZoneInfo("Europe/Berlin")
    with _client() as client:
        dep = _deployment(client, "ptq-scheduled")
        deadline = time.monotonic() + 60
        while len(runs := _runs_of(client, dep.id)) < 3 and time.monotonic() < deadline:
            time.sleep(1)
    starts = sorted(r.expected_start_time.astimezone(berlin) for r in runs)
    assert len(starts) >= 3, runs
    assert all(r.state.type.value == "SCHEDULED" for r in runs)
    now = datetime.now(berlin)
    first = now.replace(hour=2, minute=0, second=0, microsecond=0)
    if first <= now:
        first += timedelta(days=1)
    expected = [(first + timedelta(days=i)).replace(hour=2) for i in range(len(starts))]
    assert [(s.date(), s.hour, s.minute) for s in starts] == [(e.date(), 2, 0) for e in expected]


@pytest.mark.parametrize("bad, field", [({"calib_batches": -1}, "calib_batches"), ({"calib_method": "median"}, "calib_method")])
def test_bad_parameters_are_refused_by_the_schema_before_any_run(stack, bad, field):
    from prefect.exceptions import PrefectHTTPStatusError

    with _client() as client:
        dep = _deployment(client, "ptq-on-demand")
        before = len(_runs_of(client, dep.id))
        with pytest.raises(PrefectHTTPStatusError) as err:
            client.create_flow_run_from_deployment(dep.id, parameters={"params": bad})
        assert err.value.response.status_code == 409 and field in err.value.response.text
        cli = stack.server.run(PREFECT, "deployment", "run", "bevfusion-ptq/ptq-on-demand",
                               "--params", json.dumps({"params": bad}), check=False)
        assert cli.returncode != 0 and field in cli.stdout + cli.stderr
        assert len(_runs_of(client, dep.id)) == before


def test_on_demand_run_triggered_through_the_api_completes_on_a_worker(stack):
    sent = stack.params("out-api")
    with _client() as client:
        dep = _deployment(client, "ptq-on-demand")
        t0 = time.monotonic()
        created = client.create_flow_run_from_deployment(dep.id, parameters=sent)  # what the UI's form posts
        run = wait_for_run(client, created.id, logs=[stack.workers_log])
        elapsed = time.monotonic() - t0
        print(f"\nptq-on-demand: trigger -> Completed in {elapsed:.1f} s")
        assert run.work_queue_name == "on-demand"
        _check_completed(client, run, stack, sent)


def test_event_and_cli_runs_share_the_gpu_limit_and_take_the_checkpoint_from_the_event(stack):
    cli_sent = stack.params("out-cli", seed=1)
    event_out = stack.server.root / "out-event"
    # Announce first (it returns once the event is sent), then the CLI trigger right after:
    # both runs are created within seconds, well inside a run's duration.
    announce = subprocess.run(
        [BEVFUSION_PTQ, "announce-checkpoint", str(stack.checkpoint),
         "--data-root", str(stack.data_root), "--calib-batches", "1", "--calib-method", "max",
         "--output", str(event_out), "--device", "cpu"],
        cwd=REPO, env=stack.server.env, capture_output=True, text=True, timeout=300)
    assert announce.returncode == 0, announce.stdout + announce.stderr
    assert "bevfusion.checkpoint.created" in announce.stdout
    stack.server.run(PREFECT, "deployment", "run", "bevfusion-ptq/ptq-on-demand", "--params", json.dumps(cli_sent))

    with _client() as client:
        dep = _deployment(client, "ptq-on-demand")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = [r for r in _runs_of(client, dep.id) if r.parameters["params"].get("output") == str(event_out)]
            if runs:
                break
            time.sleep(1)
        assert runs, f"no run from the event:\n{tail(stack.server.log)}"
        event_run = runs[0]
        cli_run = next(r for r in _runs_of(client, dep.id) if r.parameters == cli_sent)
        event_run = wait_for_run(client, event_run.id, logs=[stack.workers_log])
        cli_run = wait_for_run(client, cli_run.id, logs=[stack.workers_log])

        # The event's checkpoint and options, every other field at PTQParams' default.
        assert event_run.parameters["params"]["checkpoint"] == str(stack.checkpoint)
        announced = {"checkpoint", "data_root", "calib_batches", "calib_method", "output", "device"}
        assert set(event_run.parameters["params"]) == announced
        got = PTQParams(**event_run.parameters["params"])
        assert (got.calib_batches, got.calib_method, got.config) == (1, "max", "bevfusion-tiny")
        _check_completed(client, event_run, stack, event_run.parameters)
        _check_completed(client, cli_run, stack, cli_sent)

        # Both flow runs were in flight together (else the limit proved nothing) ...
        a, b = sorted([event_run, cli_run], key=lambda r: r.start_time)
        assert b.start_time < a.end_time, "the two runs did not overlap; the limit was not exercised"
        # ... yet their GPU stages never overlapped: the tag limit `gpu` = 1 held.
        calib = sorted(
            (t for r in (event_run, cli_run) for t in _task_runs(client, r.id) if "gpu" in t.tags),
            key=lambda t: t.start_time,
        )
        assert len(calib) >= 2
        for first, second in zip(calib, calib[1:]):
            assert second.start_time >= first.end_time, (first.name, first.end_time, second.name, second.start_time)
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1


class KubernetesJobConfiguration(BaseJobConfiguration):
    """The fields prefect-kubernetes' worker reads from a rendered template (not installed here)."""

    namespace: str = "default"
    job_manifest: dict[str, Any]
    cluster_config: Any = None
    job_watch_timeout_seconds: int | None = None
    pod_watch_timeout_seconds: int = 60
    stream_output: bool = True


def test_kubernetes_pool_takes_our_template_and_renders_gpu_count_into_the_job(stack):
    """Created through the CLI (the server validates it), read back, rendered as a worker does."""
    stack.server.run(PREFECT, "work-pool", "create", "bevfusion-k8s", "--type", "kubernetes",
                     "--base-job-template", "deployments/k8s-gpu-job-template.json")
    with _client() as client:
        pool = client.read_work_pool("bevfusion-k8s")
    assert pool.type == "kubernetes"
    values = {"gpu_count": 2, "image": "registry.example/bevfusion-ptq:cu126",
              "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
    config = asyncio.run(KubernetesJobConfiguration.from_template_and_values(pool.base_job_template, values))
    pod = config.job_manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["image"] == values["image"]
    assert pod["nodeSelector"] == values["node_selector"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    default = asyncio.run(KubernetesJobConfiguration.from_template_and_values(pool.base_job_template, {}))
    assert default.job_manifest["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
