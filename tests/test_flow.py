"""The PTQ flow on bevfusion-tiny with generated data, against a real Prefect API.

One state directory is shared by the module's runs on purpose: caching is what is tested.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

from bevfusion_ptq.errors import CheckpointError
from bevfusion_ptq.hashing import file_sha256
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline import StageRef
from bevfusion_ptq.workdir import load_model
from tasks import stages

REPO = Path(__file__).resolve().parents[1]
STAGES = (
    "prepare-checkpoint", "build-dataset", "load-model", "insert-quantizers", "fuse-bn", "collect-statistics",
    "compute-amax", "fidelity-report", "export-onnx", "evaluate", "save-artifacts",
)


@pytest.fixture
def no_retry_delay(monkeypatch):
    monkeypatch.setattr(stages.collect_statistics, "retry_delay_seconds", [0, 0, 0])
    monkeypatch.setattr(stages.collect_statistics, "retry_jitter_factor", None)


def _params(tmp: Path, **overrides) -> PTQParams:
    """Small runs. The gate is off: 4 calibration batches and 2 evaluated keyframes make noisy
    mAP deltas, and these tests are about caching and orchestration (the gate has its own)."""
    return PTQParams(**{"output": str(tmp / "out"), "calib_batches": 4, "fidelity_batches": 1, "device": "cpu",
                        "eval_samples": 2, "max_map_drop": None, "max_nds_drop": None, **overrides})


def _task_runs(flow_run_id: str) -> dict[str, object]:
    """Task runs of one flow run by task name (the stage tasks run once each)."""
    import asyncio

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return {r.name.rsplit("-", 1)[0]: r for r in asyncio.run(read())}


def _states(flow_run_id: str) -> dict[str, str]:
    runs = _task_runs(flow_run_id)
    return {name: runs[name].state.name for name in STAGES}


def _files(version_dir: Path) -> dict[str, str]:
    manifest = json.loads((version_dir / "manifest.json").read_text())
    return {f["name"]: f["sha256"] for f in manifest["files"]}


def _check_version_dir(version_dir: Path) -> dict:
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert {"version", "model", "created_at", "files", "package_version", "git_commit", "flow_run_id", "fidelity"} <= manifest.keys()
    names = {f["name"] for f in manifest["files"]}
    assert {"model.pth", "state_dict.pth", "quantizers.json", "status.md", "fidelity.json", "config.json"} <= names
    assert any(n.startswith("plots/") and n.endswith(".png") for n in names)
    onnx_files = {"camera.backbone.onnx", "camera.vtransform.onnx", "fuser.onnx", "head.bbox.onnx",
                  "head.bbox.layernormplugin.onnx", "lidar.backbone.xyz.onnx"}
    assert {f"onnx_int8/{n}" for n in onnx_files} | {"deploy.md"} <= names  # the default --export int8
    assert {e["name"] for e in manifest["export"]} == onnx_files
    on_disk = {p.relative_to(version_dir).as_posix() for p in version_dir.rglob("*") if p.is_file()} - {"manifest.json"}
    assert names == on_disk
    for entry in manifest["files"]:
        path = version_dir / entry["name"]
        assert path.stat().st_size == entry["size"]
        assert file_sha256(path) == entry["sha256"]
    quantizers = json.loads((version_dir / "quantizers.json").read_text())
    enabled = [q for q in quantizers if q["enabled"]]
    assert len(quantizers) == 120 and len(enabled) == 116
    for q in enabled:
        values = q["amax"] if isinstance(q["amax"], list) else [q["amax"]]
        assert values and all(v is not None and 0 < v < float("inf") for v in values), q["name"]
    assert 0 < manifest["fidelity"]["min_cosine"] <= 1
    return manifest


def _calibrated_amax(home: Path, key: str) -> dict[str, torch.Tensor]:
    path = home / "work" / "compute_amax" / key / "model.pt"
    ref = StageRef(stage="compute_amax", key=key, path=str(path), sha256=file_sha256(path), made_from={})
    return {k: v for k, v in load_model(ref).state_dict().items() if k.endswith("._amax")}


@pytest.mark.slow
def test_first_run_writes_artifacts_then_identical_run_is_all_cached(prefect_api, home, tmp_path):
    from flows.ptq import ptq

    params = _params(home)
    first = ptq(params)
    assert set(_states(first["flow_run_id"]).values()) == {"Completed"}
    version_dir = Path(first["path"])
    assert version_dir.parent == home / "out" / "bevfusion-tiny"
    manifest = _check_version_dir(version_dir)
    assert manifest["version"] == first["version"] == version_dir.name
    assert manifest["flow_run_id"] == first["flow_run_id"]
    assert json.loads((home / "out" / "bevfusion-tiny" / "latest.json").read_text())["version"] == first["version"]

    exported = torch.load(version_dir / "model.pth", weights_only=False)
    state = torch.load(version_dir / "state_dict.pth", weights_only=True)
    assert set(exported.module.state_dict()) == set(state)

    # The run's artifacts, read back through the API.
    import asyncio

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[first["flow_run_id"]]))
            )

    kinds = {}
    for a in asyncio.run(artifacts()):
        kinds.setdefault(a.type, []).append(a)
    assert {"table", "markdown", "progress"} <= kinds.keys() and "image" not in kinds
    assert all(a.key for a in kinds["table"] + kinds["markdown"])
    plots = next(a.data for a in kinds["markdown"] if a.key == "activation-histograms")
    assert plots.count("](data:image/png;base64,") == len(list((version_dir / "plots").glob("*.png"))) > 0
    assert sorted(a.key for a in kinds["progress"]) == ["calibration-progress", "evaluation-progress"]
    assert [a.data for a in kinds["progress"]] == [100.0, 100.0]
    summary = next(a.data for a in kinds["markdown"] if a.key == "ptq-summary")
    assert first["version"] in summary and "| collect-statistics |" in summary and "camera BEV" in summary
    table = next(a for a in kinds["table"] if a.key == "quantizer-status")
    assert "layer3-lateral0" in str(table.data)
    # One short cell per amax: the scalar, or min / median / max of a per-channel one.
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert all(len(str(r["amax"])) < 40 for r in rows)
    assert first["recomputed"] == list(STAGES)

    again = ptq(params)
    assert _states(again["flow_run_id"]) == {s: "Cached" for s in STAGES}
    assert again["recomputed"] == []
    assert again["version"] == first["version"] and again["path"] == first["path"]
    assert _files(Path(again["path"])) == _files(version_dir)
    assert sorted(p.name for p in version_dir.parent.iterdir() if p.is_dir()) == [first["version"]]


@pytest.fixture
def forwards(monkeypatch):
    """Counts every BEVFusion forward in this process (collection calls ``extract_features``,
    the fidelity report ``forward``); the flow runs its tasks in this process."""
    from bevfusion_ptq.model.bevfusion import BEVFusion

    counts = {"forward": 0, "extract_features": 0}
    for name in counts:
        original = getattr(BEVFusion, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(BEVFusion, name, counted)
    return counts


@pytest.mark.slow
def test_changed_method_reruns_only_compute_amax_and_what_follows(prefect_api, home, forwards):
    from flows.ptq import ptq

    # No evaluation here, so that every forward counted below is the fidelity report's.
    result = ptq(_params(home, calib_method="percentile", eval_samples=0))
    states = _states(result["flow_run_id"])
    assert states == {
        "prepare-checkpoint": "Cached", "build-dataset": "Cached", "load-model": "Cached",
        "insert-quantizers": "Cached", "fuse-bn": "Cached", "collect-statistics": "Cached",
        "compute-amax": "Completed", "fidelity-report": "Completed", "export-onnx": "Completed",
        "evaluate": "Completed", "save-artifacts": "Completed",
    }
    # Only the fidelity report ran the model (FP32 and INT8 pass of its one batch): no collection.
    assert forwards == {"forward": 2, "extract_features": 2}
    # A new version next to the first; latest moved to it.
    versions = [p for p in (home / "out" / "bevfusion-tiny").iterdir() if p.is_dir()]
    assert len(versions) == 2
    latest = json.loads((home / "out" / "bevfusion-tiny" / "latest.json").read_text())
    assert latest["version"] == result["version"]


@pytest.mark.slow
def test_changed_method_percentile_or_exclusions_run_no_forward_pass(prefect_api, home, forwards):
    """With the fidelity report and the evaluation off, a warm run that changes only how amax
    is decided runs the model zero times, and each setting gives its own amax."""
    from flows.ptq import ptq

    # Fidelity report and evaluation off: each would run the model on purpose.
    ptq(_params(home, fidelity_batches=0, eval_samples=0))  # warm: statistics collected (or cached already)
    forwards.update(forward=0, extract_features=0)
    amax = {}
    for change in ({"calib_method": "entropy"}, {"calib_method": "percentile", "percentile": 99.9},
                   {"exclude": ["decoder.neck"]}):
        result = ptq(_params(home, fidelity_batches=0, eval_samples=0, **change))
        states = _states(result["flow_run_id"])
        assert states["collect-statistics"] == "Cached" and states["compute-amax"] == "Completed", change
        key = json.loads((Path(result["path"]) / "manifest.json").read_text())["inputs"]["stage_keys"]["compute_amax"]
        amax[json.dumps(change)] = _calibrated_amax(home, key)
    assert forwards == {"forward": 0, "extract_features": 0}
    entropy, pct = amax['{"calib_method": "entropy"}'], amax['{"calib_method": "percentile", "percentile": 99.9}']
    assert any(not torch.equal(entropy[k], pct[k]) for k in entropy)


@pytest.mark.slow
def test_auto_method_and_auto_exclusions_reuse_the_statistics(prefect_api, home, forwards):
    """auto measures on held-out batches and records its choices; auto:<target> runs the
    sensitivity stage, whose proposal compute-amax applies; nothing is collected again."""
    import asyncio

    from flows.ptq import ptq

    ptq(_params(home, fidelity_batches=0))  # warm statistics
    forwards.update(forward=0, extract_features=0)
    # Two groups analysed (the others stay INT8): a few forwards instead of two per group.
    some = ["encoders.lidar.backbone.conv_input", "decoder.neck.deblocks.0"]
    result = ptq(_params(home, calib_method="auto", exclude=["auto:0.5"], heldout_batches=1, sensitivity_groups=some))
    runs = _task_runs(result["flow_run_id"])
    assert runs["collect-statistics"].state.name == "Cached"
    assert runs["sensitivity"].state.name == "Completed" and runs["compute-amax"].state.name == "Completed"
    # The model ran only on held-out and fidelity batches (auto's choices are measured once and
    # shared by the sensitivity and compute-amax stages); the statistics were not collected again.
    assert forwards["extract_features"] > 0
    sensitivity = json.loads(next((home / "work" / "sensitivity").glob("*/sensitivity.json")).read_text())
    proposal = sensitivity["proposal"]
    assert proposal["met"] and proposal["target"] == 0.5
    quantizers = {q["name"]: q for q in json.loads((Path(result["path"]) / "quantizers.json").read_text())}
    autos = [q for q in quantizers.values() if q["calibrator"] == "histogram"]
    assert autos and all(q["method"] == f"auto:{q['auto']['winner']}" for q in autos)
    assert all(not quantizers[p]["enabled"] for p in proposal["quantizers"] if p in quantizers)
    assert "auto:" in (Path(result["path"]) / "status.md").read_text()
    manifest = json.loads((Path(result["path"]) / "manifest.json").read_text())
    assert manifest["inputs"]["calibration"]["exclude"] == ["auto:0.5"]

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[result["flow_run_id"]]))
            )

    by_key = {a.key: a for a in asyncio.run(artifacts()) if a.key}
    assert by_key["sensitivity"].type == "table"
    assert "data:image/png;base64," in by_key["sensitivity-chart"].data

    # The CLI's analysis on the same state: everything up to the statistics cached, one line per group.
    env = {**os.environ, "BEVFUSION_PTQ_HOME": str(home), "PREFECT_API_URL": prefect_api}
    cmd = [sys.executable, "-m", "flows.cli", "sensitivity", "--calib-batches", "4", "--device", "cpu",
           "--calib-method", "auto", "--heldout-batches", "1", "--sensitivity-target", "0.5", "--top", "3",
           "--sensitivity-groups", some[0], "--sensitivity-groups", some[1]]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert sum(1 for line in lines if line.startswith("   ") and line.strip()[:1].isdigit()) == 2  # both groups, fewer than --top
    assert "proposed exclusions for a drop <= 0.5" in proc.stdout


@pytest.mark.slow
def test_fault_at_batch_k_resumes_from_the_saved_state(prefect_api, home, monkeypatch, no_retry_delay, tmp_path):
    """4 batches, state saved every 2, failure injected after batch 3: the retry collects
    batches 3 and 4 only (1 recomputed) and the amax equals the uninterrupted run's."""
    from flows.ptq import ptq

    ptq(_params(home))  # the uninterrupted run (cached from the first test when run with it)
    fresh = tmp_path / "fresh"
    monkeypatch.setenv("BEVFUSION_PTQ_HOME", str(fresh))
    monkeypatch.setenv(stages.FAIL_AT_BATCH_ENV, "3")
    result = ptq(_params(home, calib_checkpoint_every=2))
    run = _task_runs(result["flow_run_id"])["collect-statistics"]
    assert run.state.name == "Completed" and run.run_count == 2
    (stats_key,) = [p.name for p in (fresh / "work" / "collect_statistics").iterdir()]
    (key,) = [p.name for p in (fresh / "work" / "compute_amax").iterdir()]
    # Content keys: the same inputs in another state directory give the same key (the
    # checkpoint interval is not an input).
    assert (home / "work" / "compute_amax" / key / "model.pt").is_file()
    resumed = json.loads((fresh / "work" / "collect_statistics" / stats_key / "stage.json").read_text())
    assert resumed["made_from"]["resumed_from"] == 2 and resumed["made_from"]["collected"] == 2
    theirs = torch.load(home / "work" / "collect_statistics" / stats_key / "statistics.pt", weights_only=True)
    ours = torch.load(fresh / "work" / "collect_statistics" / stats_key / "statistics.pt", weights_only=True)
    assert ours.keys() == theirs.keys()
    for name in ours:
        for field, value in ours[name].items():
            assert torch.equal(value, theirs[name][field]) if isinstance(value, torch.Tensor) else value == theirs[name][field]
    ours, theirs = _calibrated_amax(fresh, key), _calibrated_amax(home, key)
    assert ours.keys() == theirs.keys() and len(ours) >= 120  # shared quantizers appear under every path
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert not (fresh / "work" / "collect_statistics" / stats_key / "calibration-state.pt").exists()


@pytest.mark.slow
def test_bad_checkpoint_fails_at_once_naming_the_key(prefect_api, home, tmp_path):
    from bevfusion_ptq.model.checkpoint import make_checkpoint
    from bevfusion_ptq.model.config import load_config
    from flows.ptq import ptq

    path = tmp_path / "broken.pth"
    make_checkpoint(path, load_config("bevfusion-tiny"), seed=1)
    ckpt = torch.load(path, weights_only=False)
    del ckpt["state_dict"]["fuser.0.weight"]
    torch.save(ckpt, path)
    state = ptq(_params(home, checkpoint=str(path)), return_state=True)
    assert state.is_failed()
    with pytest.raises(CheckpointError, match="fuser.0.weight"):
        state.result()
    load = _task_runs(str(state.state_details.flow_run_id))["load-model"]
    assert load.state.name == "Failed" and load.run_count == 1


@pytest.mark.slow
def test_two_identical_runs_started_together_calibrate_once(prefect_api, tmp_path):
    """Two CLI processes, one Prefect server, one state directory: one calibrates, one waits
    on the lock and takes its result."""
    env = {**os.environ, "BEVFUSION_PTQ_HOME": str(tmp_path / "state"), "PREFECT_API_URL": prefect_api}
    cmd = [sys.executable, "-m", "flows.cli", "run", "--output", str(tmp_path / "out"),
           "--calib-batches", "2", "--fidelity-batches", "1", "--device", "cpu",
           "--export", "none", "--eval-samples", "0"]  # the race is over collect-statistics
    started = datetime.datetime.now(datetime.timezone.utc)
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    import asyncio

    async def calibrate_runs():
        async with get_client() as client:
            return [r for r in await client.read_task_runs()
                    if r.name.startswith("collect-statistics-") and r.created >= started]

    assert sorted(r.state.name for r in asyncio.run(calibrate_runs())) == ["Cached", "Completed"]
    versions = [p.name for p in (tmp_path / "out" / "bevfusion-tiny").iterdir() if p.is_dir()]
    assert len(versions) == 1


def test_cli_run_with_embedded_defaults(tmp_path):
    """The README's main command, as a user runs it (ephemeral local Prefect API): the trained
    demo model, calibrated and evaluated with every default, passes the default gate."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["BEVFUSION_PTQ_HOME"] = str(tmp_path / "state")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--output", str(tmp_path / "artifacts")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Real numbers in both precisions (random weights score 0), and the default gate's verdict.
    scores = dict(re.findall(r"^(FP32|INT8): mAP ([0-9.]+)", proc.stdout, flags=re.M))
    assert set(scores) == {"FP32", "INT8"} and min(float(v) for v in scores.values()) > 10, proc.stdout
    assert "gate passed" in proc.stdout
    versions = [p for p in (tmp_path / "artifacts" / "bevfusion-tiny").iterdir() if p.is_dir()]
    assert len(versions) == 1
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"written to {versions[0]} (version {versions[0].name}; recomputed: ")
    _check_version_dir(versions[0])
    # Progress lines of the library reach the console, with rate and ETA.
    assert "calibration batch 8/8" in proc.stderr and "ETA" in proc.stderr
    # One logging configuration: no glog-style lines, no per-quantizer chatter.
    for noise in ("Logging before flag parsing", "Disable MaxCalibrator", "Enable MaxCalibrator", "Overwriting amax"):
        assert noise not in proc.stderr
    # Prefect state stayed under our state directory, not in ~/.prefect.
    assert (tmp_path / "state" / "prefect").is_dir()

    # The same run again through the flow: every stage cached, and the last line says so.
    again = subprocess.run(proc.args + ["--full-flow"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    done = f"already published at {versions[0]}, nothing recomputed (version {versions[0].name})"
    assert again.stdout.strip().splitlines()[-1] == done
    # And without --full-flow: answered from the published version, without the flow.
    fast = subprocess.run(proc.args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert fast.returncode == 0 and fast.stdout.strip() == done, fast.stderr[-4000:]
    assert "Finished in state" not in fast.stderr and "Finished in state Completed" in again.stderr
    # Every line, Prefect's server included, in one format: none glog-style ("I1202 05:34:09.16 ...]").
    assert not re.search(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ ", proc.stderr + again.stderr, re.M)


def test_cli_bad_parameter_fails_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--calib-batches", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 3
    assert "--calib-batches" in proc.stderr and "greater than or equal to 1" in proc.stderr
