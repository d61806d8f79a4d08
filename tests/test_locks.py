"""Stage locks: a dead holder's lock is broken, a live holder is waited on.

Holders are real processes: a child acquires the lock and is then killed (or keeps it).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from tasks.locks import LEGACY_MAX_AGE_S, LeasedLockManager

REPO = Path(__file__).resolve().parents[1]
KEY = "calibrate-0123abcd"

HOLD = """
import sys, time
from pathlib import Path
from tasks.locks import LeasedLockManager
locks = LeasedLockManager(Path(sys.argv[1]), lease_s=float(sys.argv[2]))
assert locks.acquire_lock(sys.argv[3], holder="child", acquire_timeout=5)
print("held", flush=True)
if sys.argv[4] == "release":
    sys.stdin.readline()
    locks.release_lock(sys.argv[3], holder="child")
    print("released", flush=True)
time.sleep(600)
"""


def _holder(lock_dir: Path, lease_s: float = 60.0, then: str = "hold") -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock_dir), str(lease_s), KEY, then],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _record(lock_dir: Path) -> dict:
    return json.loads((lock_dir / f"{KEY}.lock").read_text())


def test_lock_of_a_killed_holder_is_broken_at_once_with_a_warning(tmp_path, caplog):
    proc = _holder(tmp_path)
    record = _record(tmp_path)
    assert record["pid"] == proc.pid and record["host"] and record["expiration"]
    proc.kill()  # SIGKILL: no cleanup, and not reaped yet (a zombie)
    locks = LeasedLockManager(tmp_path)
    with caplog.at_level(logging.WARNING, logger="bevfusion_ptq.locks"):
        started = time.monotonic()
        assert locks.acquire_lock(KEY, holder="me", acquire_timeout=30)
    assert time.monotonic() - started < 10  # broken, not waited out (the lease is 60 s)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"pid {proc.pid}" in warning.message and "its process is gone" in warning.message
    assert _record(tmp_path)["holder"] == "me"
    locks.release_lock(KEY, holder="me")
    assert not (tmp_path / f"{KEY}.lock").exists()
    proc.wait()


def test_live_holder_is_waited_for_until_it_releases(tmp_path):
    proc = _holder(tmp_path, then="release")
    try:
        locks = LeasedLockManager(tmp_path)
        assert locks.is_locked(KEY) and not locks.is_lock_holder(KEY, "me")
        assert not locks.acquire_lock(KEY, holder="me", acquire_timeout=1.0)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "released"
        assert locks.acquire_lock(KEY, holder="me", acquire_timeout=10)
        locks.release_lock(KEY, holder="me")
    finally:
        proc.kill()
        proc.wait()


def test_holder_renews_its_lease_while_alive(tmp_path):
    proc = _holder(tmp_path, lease_s=0.9)
    try:
        first = _record(tmp_path)["expiration"]
        time.sleep(2.5)  # several leases: the lock would have expired without renewal
        renewed = _record(tmp_path)["expiration"]
        assert renewed > first
        assert not LeasedLockManager(tmp_path).acquire_lock(KEY, holder="me", acquire_timeout=1.0)
    finally:
        proc.kill()
        proc.wait()


def _write(lock_dir: Path, record: dict) -> Path:
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{KEY}.lock"
    path.write_text(json.dumps(record))
    return path


def test_lock_of_another_host_is_kept_until_its_lease_runs_out(tmp_path, caplog):
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1.5)
    # PID 1 exists here, but on another host it says nothing: only the lease counts.
    _write(tmp_path, {"holder": "x", "expiration": soon.isoformat(), "host": "gpu-node-7", "pid": 999999})
    locks = LeasedLockManager(tmp_path)
    assert not locks.acquire_lock(KEY, holder="me", acquire_timeout=0.5)
    with caplog.at_level(logging.WARNING, logger="bevfusion_ptq.locks"):
        assert locks.acquire_lock(KEY, holder="me", acquire_timeout=10)
    assert any("gpu-node-7" in r.message and "lease expired" in r.message for r in caplog.records)


def test_prefect_style_record_without_expiration_is_broken_only_when_very_old(tmp_path):
    """What Prefect's FileSystemLockManager leaves behind: a random holder, no expiration."""
    path = _write(tmp_path, {"holder": "7f1c9b0e-uuid", "expiration": None})
    locks = LeasedLockManager(tmp_path)
    assert not locks.acquire_lock(KEY, holder="me", acquire_timeout=0.3)
    old = time.time() - LEGACY_MAX_AGE_S - 60
    os.utime(path, (old, old))
    assert locks.acquire_lock(KEY, holder="me", acquire_timeout=5)


def test_an_empty_record_is_waited_on_briefly_then_broken(tmp_path, monkeypatch):
    """Prefect's manager creates the file first and writes it after: a writer killed in
    between leaves an empty file."""
    path = _write(tmp_path, {})
    path.write_bytes(b"")
    locks = LeasedLockManager(tmp_path)
    assert not locks.acquire_lock(KEY, holder="me", acquire_timeout=0.3)
    old = time.time() - 120
    os.utime(path, (old, old))
    assert locks.acquire_lock(KEY, holder="me", acquire_timeout=5)


def test_two_live_processes_take_turns(tmp_path):
    """Mutual exclusion still holds: of several contenders exactly one holds the lock."""
    script = """
import sys, time
from pathlib import Path
from tasks.locks import LeasedLockManager
locks = LeasedLockManager(Path(sys.argv[1]))
for i in range(5):
    assert locks.acquire_lock(sys.argv[2], holder=f"{sys.argv[3]}-{i}", acquire_timeout=60)
    marker = Path(sys.argv[1]) / "inside"
    assert not marker.exists(), "two holders at once"
    marker.touch(); time.sleep(0.05); marker.unlink()
    locks.release_lock(sys.argv[2], holder=f"{sys.argv[3]}-{i}")
"""
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path), KEY, name], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
        for name in ("a", "b", "c")
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err


def test_lock_file_name_is_prefects(tmp_path):
    """Locks live where Prefect's FileSystemLockManager put them, so old stale files are found."""
    from prefect.locking.filesystem import FileSystemLockManager

    assert FileSystemLockManager(tmp_path)._lock_path_for_key(KEY) == LeasedLockManager(tmp_path)._path(KEY)
