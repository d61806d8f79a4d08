"""The fault matrix: what a user sees when something breaks, and that nothing is lost.

Each test names the fault, what the user sees, and asserts what is left on disk (and in
S3): saved state kept, nothing half-published, no process left behind. Rows of the matrix
that have their own tests elsewhere are not repeated here:

* checksum mismatch seen by a consumer, credentials absent from logs: ``test_fetch.py``;
* upload interrupted mid-file (SIGKILL, a dropped multipart part): ``test_publish.py``;
* a dataset that is empty, too small or missing files, truncated files: ``test_data_errors.py``;
* a checkpoint with missing or mismatched keys: ``test_model_checkpoint.py``, ``test_flow.py``;
* two identical runs at once: ``test_flow.py``; a dead holder's lock: ``test_locks.py``.

The runs here are real ``bevfusion-ptq run`` processes on bevfusion-tiny with a few
batches and the cheap ``percentile`` method (resume and interrupts do not depend on it).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from s3_server import moto_server, s3  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
BATCHES = 4


def _cmd(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "flows.cli", "run", "--output", str(out), "--calib-batches", str(BATCHES),
        "--calib-method", "percentile", "--fidelity-batches", "1", "--device", "cpu", *extra,
    ]


def _env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["BEVFUSION_PTQ_HOME"] = str(state)
    env["PYTHONPATH"] = str(REPO)
    return env


class Run:
    """A ``bevfusion-ptq run`` in its own session (like a terminal job), stderr read live."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 600) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output[-4000:]}")

    def finish(self, timeout: float = 600) -> int:
        rc = self.proc.wait(timeout)
        deadline = time.monotonic() + 10
        while self._queue.get() is not None and time.monotonic() < deadline:
            pass
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (the temporary server, data-loader workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if state[state.rindex(")") + 2] != "Z":
            left.add(pid)
    return left


def _gone_within(pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while (left := _alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:  # do not leak them into the rest of the suite
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _version(out: Path) -> Path:
    (version,) = [p for p in (out / "bevfusion-tiny").iterdir() if p.is_dir()]
    return version


def _amax(version: Path) -> dict:
    return {q["name"]: q["amax"] for q in json.loads((version / "quantizers.json").read_text())}


@pytest.mark.slow
def test_run_killed_mid_calibration_is_resumed_by_the_same_command(tmp_path):
    """Fault: SIGKILL (OOM kill, pre-emption) after the state of batch 2 was saved.
    The user sees: the same command again completes, with a WARNING that it broke the dead
    run's lock and an INFO that it resumed at batch 2; nothing else to do."""
    state, out = tmp_path / "state", tmp_path / "out"
    # Export and evaluation off: the fault is in calibration, and the three runs compare amax.
    after = ("--export", "none", "--eval-samples", "0")
    killed = Run(_cmd(out, "--calib-checkpoint-every", "2", *after), _env(state))
    killed.wait_for(r"calibration state saved after batch 2")
    children = _descendants(killed.proc.pid)
    locks = list((state / "prefect-cache" / "locks").glob("collect-statistics-*.lock"))
    assert locks, "the collect-statistics stage holds its lock"
    killed.proc.kill()
    killed.finish()
    # The temporary Prefect server and the data-loader workers die with the run.
    assert children and not _gone_within(children, 30)
    assert all(p.exists() for p in locks)  # the dead run's lock is still there

    started = time.monotonic()
    again = Run(_cmd(out, "--calib-checkpoint-every", "2", *after), _env(state))
    assert again.finish() == 0, again.output[-4000:]
    recovery_s = time.monotonic() - started
    text = " ".join(again.output.split())  # Prefect's console wraps long lines
    assert re.search(rf"broke the stale lock .*collect-statistics-.*pid {killed.proc.pid} .*its process is gone", text), text[-4000:]
    assert f"resuming calibration at batch 2 of {BATCHES}" in text
    assert "calibration batch 1/" not in text and f"calibration batch {BATCHES}/{BATCHES}" in text
    (stage,) = (state / "work" / "collect_statistics").glob("*/stage.json")
    made_from = json.loads(stage.read_text())["made_from"]
    assert made_from["resumed_from"] == 2 and made_from["collected"] == BATCHES - 2
    assert not list((state / "work" / "collect_statistics").glob("*/calibration-state.pt"))
    assert not list((state / "prefect-cache" / "locks").glob("*.lock"))

    fresh = Run(_cmd(tmp_path / "out-fresh", *after), _env(tmp_path / "state-fresh"))
    assert fresh.finish() == 0, fresh.output[-4000:]
    assert _amax(_version(out)) == _amax(_version(tmp_path / "out-fresh"))
    print(f"\nrecovery: the same command completed in {recovery_s:.0f} s")


@pytest.mark.slow
@pytest.mark.parametrize("sig, target, rc", [
    (signal.SIGINT, "group", 130),  # Ctrl-C in a terminal: the whole foreground process group
    (signal.SIGTERM, "process", 143),  # a scheduler or `kill`: the run's process only
], ids=["ctrl-c", "sigterm"])
def test_interrupted_run_stops_after_the_batch_with_state_saved_and_no_process_left(tmp_path, sig, target, rc):
    """Fault: Ctrl-C or SIGTERM in the middle of calibration.
    The user sees: a WARNING that calibration stops after the current batch with its state
    saved, then one line 'stopped by SIGINT/SIGTERM'; exit code 128+signal, within seconds."""
    state, out = tmp_path / "state", tmp_path / "out"
    run = Run(_cmd(out, "--calib-checkpoint-every", "100"), _env(state))
    run.wait_for(r"calibration batch 1/")
    children = _descendants(run.proc.pid)
    started = time.monotonic()
    if target == "group":
        os.killpg(run.proc.pid, sig)
    else:
        run.proc.send_signal(sig)
    assert run.finish(timeout=120) == rc, run.output[-4000:]
    exit_s = time.monotonic() - started
    assert not _gone_within(children, 15), "a child process outlived the run"
    text = run.output
    assert re.search(r"calibration stopped after batch (\d+)", text), text[-4000:]
    assert f"stopped by {sig.name}" in text and "Traceback" not in text
    saved = list((state / "work" / "collect_statistics").glob("*/calibration-state.pt"))
    assert len(saved) == 1, "the calibration state of the last whole batch is kept"
    assert not (out / "bevfusion-tiny").exists() or not any((out / "bevfusion-tiny").iterdir())
    print(f"\n{sig.name}: exited {exit_s:.1f} s after the signal")


@pytest.mark.slow
def test_identical_inputs_give_identical_bytes_in_two_state_directories(tmp_path, monkeypatch):
    """Fault: a content-addressed file that embeds where or by whom it was written (the
    random checkpoint once held its writer's temporary file name, PID included, in its zip).
    The user sees: the same version id from any machine or state directory for the same
    inputs. Every file whose hash feeds a key or a version is compared byte for byte."""
    from bevfusion_ptq import pipeline
    from bevfusion_ptq.params import PTQParams

    def run(name: str, pid: int) -> Path:
        home = tmp_path / name
        monkeypatch.setenv("BEVFUSION_PTQ_HOME", str(home / "state"))
        monkeypatch.setattr(os, "getpid", lambda: pid)  # temporary names carry the PID
        params = PTQParams(output=str(home / "out"), checkpoint="random", calib_batches=1, fidelity_batches=1,
                           calib_method="percentile", device="cpu")
        ckpt, data, calibrated = pipeline.calibrated_in_process(params)
        fidelity = pipeline.fidelity_stage(params, calibrated, data)
        pipeline.save_artifacts_stage(params, calibrated, ckpt, data, fidelity, flow_run_id="run")
        return home

    a, b = run("a", 1111), run("b", 2222)

    def content(home: Path) -> dict[str, bytes]:
        files = {}
        for sub in ("state/checkpoints", "state/work", "out"):
            for p in sorted((home / sub).rglob("*")):
                if p.is_file() and p.suffix != ".json":  # stage.json names its own path
                    files[p.relative_to(home).as_posix()] = p.read_bytes()
        return files

    ours, theirs = content(a), content(b)
    assert ours.keys() == theirs.keys()
    assert any(k.startswith("state/checkpoints/") for k in ours) and any("/work/" in k for k in ours)
    assert [k for k in ours if ours[k] != theirs[k]] == []
    (version,) = [p for p in (a / "out" / "bevfusion-tiny").iterdir() if p.is_dir()]
    assert (b / "out" / "bevfusion-tiny" / version.name).is_dir()
    manifests = [json.loads((h / "out" / "bevfusion-tiny" / version.name / "manifest.json").read_text()) for h in (a, b)]
    for m in manifests:
        m.pop("created_at")
    assert manifests[0] == manifests[1]
    for name in ("quantizers.json", "fidelity.json", "config.json"):
        assert (version / name).read_bytes() == (b / "out" / "bevfusion-tiny" / version.name / name).read_bytes()


def test_nan_in_lidar_read_by_a_worker_is_one_line_naming_the_file(tmp_path):
    """Fault: NaN in a .pcd.bin, found inside a data-loader worker process.
    The user sees: our DatasetError naming the file, not torch's 'Caught DatasetError in
    DataLoader worker process 0' and the worker's traceback."""
    import numpy as np
    from data_helpers import TINY_DATA, generated_tree, linked_copy, make_real

    from bevfusion_ptq.data import build_calibration_set
    from bevfusion_ptq.errors import DatasetError

    tree = linked_copy(generated_tree(_Factory(tmp_path)), tmp_path / "copy")
    cset = build_calibration_set(tree, None, TINY_DATA, num_samples=2)
    lidar = make_real(cset.records[1].lidar_path)
    points = np.fromfile(lidar, dtype=np.float32).reshape(-1, 5)
    points[3, 0] = np.inf
    points.tofile(lidar)
    with pytest.raises(DatasetError) as err:
        for _ in cset.loader(num_workers=1, pin_memory=False):
            pass
    message = str(err.value)
    assert message.startswith("lidar file of sample ") and str(lidar) in message and "non-finite" in message
    assert "\n" not in message and "Caught" not in message and "Traceback" not in message


class _Factory:
    """The least of pytest's TempPathFactory that data_helpers.generated_tree uses."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path


def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    import zipfile

    from bevfusion_ptq.model.checkpoint import make_checkpoint

    good = tmp_path / "good.pth"
    make_checkpoint(good, "bevfusion-tiny", seed=0)
    files = {
        "empty": (b"", r"is empty \(0 bytes\)"),
        "text": (b"model: bevfusion\nweights: elsewhere\n", r"is a text file, not a checkpoint"),
        "json": (b'{"state_dict": {}}', r"is a JSON or text file, not a checkpoint"),
        "png": (b"\x89PNG\r\n\x1a\n" + bytes(64), r"is a PNG image, not a checkpoint"),
        "truncated": (good.read_bytes()[: good.stat().st_size // 2], r"damaged or truncated zip archive"),
    }
    out = {}
    for name, (data, expected) in files.items():
        path = tmp_path / f"{name}.pth"
        path.write_bytes(data)
        out[name] = (path, expected)
    other_zip = tmp_path / "other.pth"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("weights.bin", b"\0" * 16)
    out["zip"] = (other_zip, r"zip archive without data.pkl")
    return out


def test_files_that_are_not_checkpoints_get_one_line_saying_what_they_are(tmp_path):
    """Fault: --checkpoint points at an empty file, a text file, an image, a truncated
    download or another zip. The user sees: one line naming the file, what it is, and that
    a torch.save checkpoint was expected (never 'KeyError: 101' or an empty reason)."""
    from bevfusion_ptq.errors import CheckpointError
    from bevfusion_ptq.model.checkpoint import read_checkpoint

    for name, (path, expected) in _bad_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(path)
        message = str(err.value)
        assert re.search(expected, message), (name, message)
        assert str(path) in message and "expected a PyTorch checkpoint" in message and "\n" not in message


def test_cli_names_a_text_file_given_as_checkpoint_in_one_line(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("not weights\n")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "inspect-checkpoint", str(bad), "--config", "bevfusion-tiny"],
        cwd=REPO, env=_env(tmp_path / "state"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 4
    assert proc.stderr.strip().splitlines() == [
        f"bevfusion-ptq: error: checkpoint {bad} is a text file, not a checkpoint: expected a PyTorch checkpoint "
        "written by torch.save (a zip archive with data.pkl, or a legacy pickle)"
    ]


@contextmanager
def _tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs at ``path`` (a real full or read-only disk), or skip where mounting is not allowed."""
    path.mkdir(parents=True)
    options = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs on this machine ({proc.stderr.strip() or proc.returncode}); "
                    "read-only and full-disk faults need one")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _ckpt_ref(tmp_path: Path):
    from bevfusion_ptq.hashing import file_sha256
    from bevfusion_ptq.model.checkpoint import make_checkpoint
    from bevfusion_ptq.pipeline import CheckpointRef

    path = tmp_path / "ckpt.pth"
    make_checkpoint(path, "bevfusion-tiny", seed=0)
    return CheckpointRef(path=str(path), sha256=file_sha256(path), generated=True, source="random")


def test_full_disk_while_writing_a_work_file_says_disk_full_and_keeps_what_was_there(tmp_path):
    """Fault: the disk fills up while a stage writes its model (torch's zip writer).
    The user sees: 'disk full: cannot save the fuse_bn work file ...' in one line; no
    partial file is left and the files already there are untouched."""
    from bevfusion_ptq.errors import DiskError
    from bevfusion_ptq.model.builder import build_model
    from bevfusion_ptq.model.config import load_config
    from bevfusion_ptq.workdir import save_model

    with _tmpfs(tmp_path / "disk", "3m") as disk:
        kept = disk / "work" / "load_model" / "k0" / "model.pt"
        kept.parent.mkdir(parents=True)
        kept.write_bytes(b"an earlier stage's output" * 1000)
        before = kept.read_bytes()
        with pytest.raises(DiskError) as err:
            save_model(build_model(load_config("bevfusion-tiny")), "fuse_bn", "k1", {}, root=disk)
        message = str(err.value)
        assert message.startswith("disk full") and "fuse_bn work file" in message and "\n" not in message
        assert kept.read_bytes() == before
        assert [p.name for p in (disk / "work" / "fuse_bn" / "k1").iterdir()] == []


def test_read_only_or_small_output_is_refused_before_calibrating(tmp_path, monkeypatch):
    """Fault: --output on a read-only mount, or on a disk without room for the artifacts.
    The user sees, before any calibration: 'read-only file system: cannot write the
    artifacts to ...' or 'disk full: ... has 1 MB free, the artifacts need about 37 MB'."""
    from bevfusion_ptq.errors import DiskError
    from bevfusion_ptq.params import PTQParams
    from bevfusion_ptq.pipeline import check_disk

    ckpt = _ckpt_ref(tmp_path)
    with _tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        with pytest.raises(DiskError, match=r"^read-only file system: cannot write the artifacts to .*/ro"):
            check_disk(PTQParams(output=str(ro / "out")), ckpt)
    with _tmpfs(tmp_path / "small", "1m") as small:
        with pytest.raises(DiskError, match=r"^disk full: .*/small/out has \d+ MB free, the artifacts need about \d+ MB"):
            check_disk(PTQParams(output=str(small / "out")), ckpt)
        monkeypatch.setenv("BEVFUSION_PTQ_HOME", str(small / "state"))
        with pytest.raises(DiskError, match=r"^disk full: .*/small/state/work has \d+ MB free, the stages' work files"):
            check_disk(PTQParams(output=str(tmp_path / "out")), ckpt)
    assert check_disk(PTQParams(output=str(tmp_path / "out")), ckpt)["output"] > 0  # the normal case passes


def test_damaged_published_version_is_repaired_from_the_intact_local_copy(s3, tmp_path):
    """Fault: one object of a published version is overwritten in S3 (bit rot, a bad sync,
    a hand edit). The user sees: fetch refuses it; `bevfusion-ptq publish` of the local copy
    says 'repaired 1 damaged file(s)'; fetch then succeeds. Only the manifest's bytes are
    written: a local copy that is damaged too repairs nothing."""
    from s3_server import make_version

    from bevfusion_ptq.errors import VerificationError
    from bevfusion_ptq.s3 import fetch_version, publish_version

    v1 = make_version(tmp_path / "out", "v1")
    publish_version(v1, s3.url("rel"))
    key = "rel/tiny-test/v1/state_dict.pth"
    good = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=good[:-10] + b"0123456789")
    latest = s3.client.get_object(Bucket=s3.bucket, Key="rel/tiny-test/latest.json")["Body"].read()
    with pytest.raises(VerificationError, match="state_dict.pth"):
        fetch_version(s3.url("rel", "tiny-test"), "v1", tmp_path / "got")

    damaged_too = tmp_path / "copy" / "v1"
    damaged_too.parent.mkdir()
    import shutil

    shutil.copytree(v1, damaged_too)
    (damaged_too / "state_dict.pth").write_bytes(good[:-10] + b"0123456789")
    with pytest.raises(VerificationError, match="copy/v1: state_dict.pth sha256"):  # fails its own manifest: nothing sent
        publish_version(damaged_too, s3.url("rel"))
    assert s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read() != good

    result = publish_version(v1, s3.url("rel"))
    assert result.reused and result.repaired == ("state_dict.pth",) and not result.latest_updated
    assert s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read() == good
    assert s3.client.get_object(Bucket=s3.bucket, Key="rel/tiny-test/latest.json")["Body"].read() == latest
    assert (fetch_version(s3.url("rel", "tiny-test"), "v1", tmp_path / "got") / "state_dict.pth").read_bytes() == good
    assert publish_version(v1, s3.url("rel")).repaired == ()  # intact: nothing written


def test_damaged_local_root_version_is_repaired_too(tmp_path):
    from s3_server import make_version

    from bevfusion_ptq.s3 import publish_version

    v1 = make_version(tmp_path / "out", "v1")
    publish_version(v1, str(tmp_path / "root"))
    published = tmp_path / "root" / "tiny-test" / "v1" / "model.pth"
    good = published.read_bytes()
    published.write_bytes(b"truncated")
    assert publish_version(v1, str(tmp_path / "root")).repaired == ("model.pth",)
    assert published.read_bytes() == good


@pytest.fixture
def proxy(moto_server):
    from fault_proxy import FaultProxy

    p = FaultProxy(moto_server.port)
    yield p
    p.close()


def _s3_keys(s3) -> set[str]:
    return {o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])}


def test_s3_503_burst_is_ridden_out_and_a_longer_outage_keeps_everything_for_later(s3, proxy, tmp_path):
    """Fault: S3 answers '503 Slow Down' to a burst of requests (from a proxy on 127.0.0.1).
    The user sees: a short burst, nothing (botocore retries); a long one, one line 'S3 kept
    failing after botocore's retries (SlowDown)' with the command to publish later; no
    manifest and no latest.json in S3, the local version intact; the later publish works."""
    from s3_server import make_version

    from bevfusion_ptq.errors import TransientStorageError
    from bevfusion_ptq.s3 import fetch_version, make_client, publish_version

    client = make_client(endpoint_url=proxy.endpoint, max_attempts=3)
    v1 = make_version(tmp_path / "out", "v1")
    proxy.fail_next(2)
    assert not publish_version(v1, s3.url("rel"), client=client).reused
    assert proxy.answered_503 == 2
    assert fetch_version(s3.url("rel", "tiny-test"), "v1", tmp_path / "got").is_dir()

    v2 = make_version(tmp_path / "out", "v2", seed=1)
    before = {p.name: p.read_bytes() for p in v2.iterdir() if p.is_file()}
    proxy.fail_next(50)
    with pytest.raises(TransientStorageError, match=r"kept failing after botocore's retries \((SlowDown|503)\).*publish it later"):
        publish_version(v2, s3.url("rel"), client=client)
    assert "rel/tiny-test/v2/manifest.json" not in _s3_keys(s3)
    assert json.loads(s3.client.get_object(Bucket=s3.bucket, Key="rel/tiny-test/latest.json")["Body"].read())["version"] == "v1"
    assert {p.name: p.read_bytes() for p in v2.iterdir() if p.is_file()} == before
    proxy.fail_next(0)
    assert publish_version(v2, s3.url("rel"), client=client).latest_updated


def test_connection_dropped_mid_upload_is_retried_and_the_version_completes(s3, proxy, tmp_path):
    """Fault: the connection drops in the middle of a file upload (a proxy cuts it).
    The user sees: nothing; botocore sends the file again and every object reads back as
    the manifest says."""
    from s3_server import add_file, make_version

    from bevfusion_ptq.s3 import fetch_version, make_client, publish_version

    v1 = make_version(tmp_path / "out", "v1")
    add_file(v1, "plots/big.png", os.urandom(400_000))
    proxy.drop_after(150_000)  # inside the upload of the 400 kB file
    publish_version(v1, s3.url("rel"), client=make_client(endpoint_url=proxy.endpoint))
    assert proxy.dropped == 1
    got = fetch_version(s3.url("rel", "tiny-test"), "v1", tmp_path / "got")
    assert (got / "plots" / "big.png").read_bytes() == (v1 / "plots" / "big.png").read_bytes()


def test_s3_unreachable_fails_in_one_line_and_publishes_nothing(s3, tmp_path):
    """Fault: the endpoint does not answer at all. The user sees: 'S3 endpoint unreachable
    after botocore's retries' and how to publish later; the local version is intact."""
    from s3_server import free_port, make_version

    from bevfusion_ptq.errors import TransientStorageError
    from bevfusion_ptq.s3 import make_client, publish_version

    v1 = make_version(tmp_path / "out", "v1")
    client = make_client(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=2)
    with pytest.raises(TransientStorageError, match="S3 endpoint unreachable after botocore's retries") as err:
        publish_version(v1, s3.url("rel"), client=client)
    assert f"bevfusion-ptq publish {v1}" in str(err.value) and "\n" not in str(err.value)
    assert _s3_keys(s3) == set()
    assert (v1 / "manifest.json").is_file()


class _Payload:
    """A pickle that runs a shell command when loaded: what a malicious checkpoint holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_without_running_its_code(tmp_path):
    """Fault: a checkpoint whose pickle runs code when loaded. The user sees: one line saying
    safe loading refused it and that --trust-pickle would run code from the file; the code
    never ran."""
    import torch

    from bevfusion_ptq.errors import CheckpointError
    from bevfusion_ptq.model.checkpoint import read_checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "meta": {"x": _Payload(marker)}}, path)
    with pytest.raises(CheckpointError, match=r"safe loading \(weights_only\) refuses: .*GLOBAL posix.system.*--trust-pickle") as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()
