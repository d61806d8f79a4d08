"""The deployment files and the event, checked without a server (fast).

The server-backed proofs are in test_deploy.py and test_ui.py; these pin what must hold for
them to mean anything: no template variable is silently dropped, the trigger template turns
our own event into valid flow parameters with Prefect's server-side renderer, and `serve`
reads the same settings as `prefect deploy`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bevfusion_ptq.params import PTQParams
from flows.cli import main
from flows.serve import CHECKPOINT_EVENT, PREFECT_FILE, checkpoint_event, runner_deployments

REPO = Path(__file__).resolve().parents[1]
K8S_TEMPLATE = REPO / "deployments" / "k8s-gpu-job-template.json"


def _yaml() -> dict:
    return yaml.safe_load(PREFECT_FILE.read_text())


def test_every_kubernetes_template_variable_reaches_the_job_configuration():
    """A variable missing from job_configuration is dropped without a word when rendering."""
    template = json.loads(K8S_TEMPLATE.read_text())
    config = json.dumps(template["job_configuration"])
    unused = [v for v in template["variables"]["properties"] if "{{ " + v + " }}" not in config]
    assert not unused
    limits = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "{{ gpu_count }}"


def _render_trigger(payload_event) -> dict:
    """The trigger's parameters rendered as the server's RunDeployment action renders them."""
    from prefect.server.events.actions import RunDeployment
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    [trigger] = next(d for d in _yaml()["deployments"] if d["name"] == "ptq-on-demand")["triggers"]
    params = json.loads(json.dumps(trigger["parameters"]))
    RunDeployment._upgrade_v1_templates(params)
    ctx = HydrationContext(raise_on_error=True, render_jinja=True, jinja_context={"event": payload_event})
    return hydrate(params, ctx)


def test_trigger_turns_our_event_into_valid_parameters():
    url = "s3://models/bevfusion/epoch_20.pth"
    event = checkpoint_event(url, PTQParams(config="bevfusion-r50", calib_batches=16, checkpoint=url))
    assert event.event == CHECKPOINT_EVENT and event.resource.name == url
    assert event.payload == {"checkpoint": url, "params": {"config": "bevfusion-r50", "calib_batches": 16}}
    rendered = _render_trigger(event)
    assert rendered == {"params": {"config": "bevfusion-r50", "calib_batches": 16, "checkpoint": url}}
    assert PTQParams(**rendered["params"]).checkpoint == url


def test_trigger_takes_a_bare_checkpoint_event_from_other_emitters():
    """A training pipeline that emits only {"checkpoint": url} still gets a run."""
    from prefect.events import Event

    event = Event(event=CHECKPOINT_EVENT, resource={"prefect.resource.id": "bevfusion.checkpoint.x"},
                  payload={"checkpoint": "/data/ckpt.pth"})
    assert _render_trigger(event) == {"params": {"checkpoint": "/data/ckpt.pth"}}


def test_served_deployments_carry_the_files_settings():
    served = {d.name: d for d in runner_deployments()}
    for spec in _yaml()["deployments"]:
        dep = served[spec["name"]]
        assert dep.entrypoint == "flows/ptq.py:ptq"
        assert dep.tags == spec["tags"] and dep.enforce_parameter_schema
        assert dep.concurrency_limit == spec["concurrency_limit"]["limit"]
        assert [s.schedule.cron for s in dep.schedules] == [s["cron"] for s in spec["schedules"]]
        assert len(dep.triggers) == len(spec.get("triggers", []))
    assert served["ptq-scheduled"].schedules[0].schedule.timezone == "Europe/Berlin"


@pytest.mark.parametrize("argv", [["--calib-batches", "0"], ["--percentile", "101"], ["--checkpoint", "/other.pth"]])
def test_announce_refuses_a_bad_event_before_sending_it(argv, capsys):
    assert main(["announce-checkpoint", "/ckpt.pth", *argv]) == 3
    assert "error" in capsys.readouterr().err


def test_announce_refuses_an_unknown_method_at_the_option():
    with pytest.raises(SystemExit) as exc:
        main(["announce-checkpoint", "/ckpt.pth", "--calib-method", "median"])
    assert exc.value.code == 2


def test_announce_and_serve_need_a_server(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}):
        assert main(["announce-checkpoint", "/ckpt.pth"]) == 3
        assert main(["serve"]) == 3
    assert "PREFECT_API_URL" in capsys.readouterr().err
