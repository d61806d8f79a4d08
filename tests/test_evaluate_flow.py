"""The evaluate stage and the gate in the PTQ flow, against a real Prefect API (and moto S3).

One state directory is shared by the module's runs, so later runs reuse the calibration
and the evaluation from the cache: only the gate, save and publish steps differ.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
from s3_server import moto_server, s3  # noqa: F401

from bevfusion_ptq.errors import GateFailedError
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.workdir import state_dir

EVAL_SAMPLES = 3  # of the generated val scene's 10 keyframes: keeps each evaluation short


def _params(out: str, **overrides) -> PTQParams:
    return PTQParams(**{"output": out, "calib_batches": 2, "fidelity_batches": 1, "device": "cpu",
                        "eval_samples": EVAL_SAMPLES, **overrides})  # fmt: skip


def _run_data(flow_run_id: str) -> tuple[dict[str, str], dict[str, list]]:
    """Task states by task name, and the run's artifacts by type."""

    async def read():
        async with get_client() as client:
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )
            return tasks, artifacts

    tasks, artifacts = asyncio.run(read())
    kinds: dict[str, list] = {}
    for a in artifacts:
        kinds.setdefault(a.type, []).append(a)
    return {t.name.rsplit("-", 1)[0]: t.state.name for t in tasks}, kinds


def _versions(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.slow
def test_evaluation_in_the_version_and_a_failed_gate_publishes_nothing(prefect_api, home):
    from flows.ptq import ptq

    out = home / "out"
    first = ptq(_params(str(out)))
    version_dir = Path(first["path"])
    report = json.loads((version_dir / "evaluation.json").read_text())
    assert report["evaluated"] and report["dataset"]["samples"] == EVAL_SAMPLES
    assert report["dataset"]["split"] == "val" and not report["dataset"]["whole_split"]
    for mode in ("fp32", "int8"):
        metrics = report["metrics"][mode]
        assert 0 <= metrics["mean_ap"] <= 1 and 0 <= metrics["nd_score"] <= 1
        assert set(metrics["tp_errors"]) == {"trans_err", "scale_err", "orient_err", "vel_err", "attr_err"}
        assert len(metrics["mean_dist_aps"]) == 10
        assert (version_dir / report["results_files"][mode]["name"]).is_file()
        assert all((version_dir / p).is_file() for p in report["plots"][mode])
    assert [r["metric"] for r in report["comparison"][:2]] == ["mAP", "NDS"]
    assert report["gate"]["status"] == "passed" and report["gate"]["thresholds"]["max_map_drop"] == 0.5
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["gate"]["status"] == "passed" and manifest["evaluation"]["samples"] == EVAL_SAMPLES
    assert "evaluation.json" in {f["name"] for f in manifest["files"]}
    assert first["gate"]["status"] == "passed" and first["evaluation"]["int8"]["mean_ap"] >= 0
    latest = out / "bevfusion-tiny" / "latest.json"
    assert json.loads(latest.read_text())["version"] == first["version"]

    states, kinds = _run_data(first["flow_run_id"])
    assert states["evaluate"] == "Completed" and states["gate"] == "Completed"
    table = next(a for a in kinds["table"] if a.key == "evaluation-fp32-int8")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["metric"] for r in rows][:2] == ["mAP", "NDS"] and {"fp32", "int8", "delta"} <= rows[0].keys()
    assert "Gate passed" in table.description
    page = next(a for a in kinds["markdown"] if a.key == "evaluation-plots")
    assert page.data.count("](data:image/png;base64,") == 2 * 5 and "file://" not in page.data

    # An impossible gate: INT8 never reproduces FP32 exactly, so a cosine of 1 fails.
    before = latest.read_bytes()
    state = ptq(_params(str(out), min_fidelity_cosine=1.0), return_state=True)
    assert state.is_failed()
    assert "gate failed: fidelity cosine" in state.message and "\n" not in state.message
    with pytest.raises(GateFailedError):
        state.result()
    assert latest.read_bytes() == before  # latest did not move
    assert _versions(out / "bevfusion-tiny") == [first["version"]]  # nothing new in the output
    (held,) = [v for v in _versions(state_dir() / "outbox" / "bevfusion-tiny")]
    held_report = json.loads((state_dir() / "outbox" / "bevfusion-tiny" / held / "evaluation.json").read_text())
    assert held_report["gate"]["status"] == "failed"
    (check,) = [c for c in held_report["gate"]["checks"] if c["passed"] is False]
    assert check["name"] == "fidelity cosine" and check["limit"] == 1.0
    assert 0 < check["excess"] == 1.0 - check["measured"]
    assert held in state.message
    # Judged again, not recomputed: the thresholds are not in the evaluation's cache key.
    states, _ = _run_data(str(state.state_details.flow_run_id))
    assert states["compute-amax"] == states["evaluate"] == "Cached" and "publish" not in states


@pytest.mark.slow
def test_s3_output_failed_gate_leaves_latest_and_the_cli_exits_with_its_code(
        prefect_api, home, s3, monkeypatch, capsys):  # noqa: F811 - s3 is the fixture
    from flows.cli import main

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)  # the CLI then keeps the harness's API
    url = s3.url("runs")
    run = ["run", "--output", url, "--calib-batches", "2", "--fidelity-batches", "1", "--device", "cpu",
           "--eval-samples", str(EVAL_SAMPLES)]  # fmt: skip

    def objects() -> dict[str, str]:
        listed = s3.client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])
        return {o["Key"]: o["ETag"] for o in listed}

    def latest() -> str:
        body = s3.client.get_object(Bucket=s3.bucket, Key="runs/bevfusion-tiny/latest.json")["Body"].read()
        return json.loads(body)["version"]

    assert main(run) == 0
    said = capsys.readouterr().out
    assert "FP32: mAP" in said and "INT8: mAP" in said and "gate passed" in said
    published, before = latest(), objects()

    assert main([*run, "--min-fidelity-cosine", "1"]) == GateFailedError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bevfusion-ptq: error: gate failed: fidelity cosine")
    assert objects() == before and latest() == published  # nothing uploaded, latest unmoved
    outbox = state_dir() / "outbox" / "bevfusion-tiny"
    held = [v for v in _versions(outbox) if v != published]
    assert len(held) == 1 and held[0] in err[-1]
    assert json.loads((outbox / held[0] / "manifest.json").read_text())["gate"]["status"] == "failed"

    # "none" everywhere skips the gate; the manifest says so, and the version is published.
    assert main([*run, "--max-map-drop", "none", "--max-nds-drop", "none"]) == 0
    assert "gate skipped" in capsys.readouterr().out
    skipped = latest()
    assert skipped not in (published, held[0])
    key = f"runs/bevfusion-tiny/{skipped}/manifest.json"
    manifest = json.loads(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    assert manifest["gate"]["status"] == "skipped" and "every threshold is none" in manifest["gate"]["reason"]
