"""Stage locks that a dead holder cannot keep.

``SERIALIZABLE`` isolation makes a second identical run wait on the first one's lock and
then take its cached result. Prefect's ``FileSystemLockManager`` writes a lock file that
never expires by itself (``"expiration": null``): when its holder is killed (SIGKILL, an
OOM kill, a pre-empted pod) every identical run after it waits forever, although the
stage's saved calibration state is waiting to be resumed.

:class:`LeasedLockManager` keeps Prefect's lock-manager interface and file location
(``<dir>/<key>.lock``) and adds two things to each lock record:

* its holder's identity: host, PID namespace, PID and the process's start time. A waiter on
  the same host breaks the lock as soon as that process is gone (or its PID was reused).
* a lease: the record's ``expiration`` is kept a lease ahead by a background thread of the
  holder. A holder on another host that dies stops renewing, and waiters anywhere break
  the lock once the lease has run out.

Breaking a lock is logged at WARNING with the dead holder's identity. Live holders are
waited on as before, so two identical live runs still serialise. Records are created with
their content in one step (hard link of a finished file), so no reader ever sees an empty
lock file; records of Prefect's own manager (no identity, no expiration) are still read,
but as they name no process (the holder is a random id), one without expiration is
broken only once it is older than the longest stage timeout (:data:`LEGACY_MAX_AGE_S`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio.to_thread
from prefect.locking.protocol import LockManager

log = logging.getLogger("bevfusion_ptq.locks")

LEASE_S = 60.0
"""How long a holder that stopped renewing (a dead host) keeps its lock."""
UNREADABLE_GRACE_S = 30.0
"""An unreadable record (a writer of Prefect's manager killed between creating and writing
the file) is broken when it is older than this."""
LEGACY_MAX_AGE_S = 6 * 3600.0
"""Records of Prefect's own manager name no process: older than this, none still runs."""
POLL_S = (0.1, 1.0)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pid_namespace() -> str:
    """Processes on one host but in other containers cannot be checked by PID."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot): tells a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _process_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


def _alive(pid: int, started: str | None) -> bool:
    """``pid`` runs (not a zombie) and, when its start time was recorded, is the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if _process_state(pid) in ("Z", "X"):
        return False  # killed, waiting to be reaped by its parent
    return started is None or _process_start(pid) in (None, started)


HOST = socket.gethostname()
PIDNS = _pid_namespace()


@dataclass
class LockRecord:
    holder: str
    expiration: dt.datetime | None
    host: str | None = None
    pidns: str | None = None
    pid: int | None = None
    started: str | None = None
    age_s: float | None = None  # of the file, for records of Prefect's own manager

    @classmethod
    def mine(cls, holder: str, lease_s: float) -> "LockRecord":
        pid = os.getpid()
        return cls(holder, _now() + dt.timedelta(seconds=lease_s), HOST, PIDNS, pid, _process_start(pid))

    @classmethod
    def parse(cls, raw: bytes) -> "LockRecord":
        data = json.loads(raw)
        expiration = data.get("expiration")
        record = cls(
            holder=str(data["holder"]),
            expiration=dt.datetime.fromisoformat(expiration) if expiration else None,
            host=data.get("host"), pidns=data.get("pidns"), pid=data.get("pid"), started=data.get("started"),
        )
        return record

    def to_json(self) -> bytes:
        return json.dumps({
            "holder": self.holder,
            "expiration": self.expiration.isoformat() if self.expiration else None,
            "host": self.host, "pidns": self.pidns, "pid": self.pid, "started": self.started,
        }).encode()

    def identity(self) -> str:
        who = f"pid {self.pid} on {self.host}" if self.pid is not None else "an unknown process"
        return f"{who} (holder {self.holder})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LockRecord) and self.to_json() == other.to_json()

    def stale_reason(self) -> str | None:
        """Why this lock's holder cannot be holding it any more, or None while it may."""
        if self.pid is None and self.expiration is None and (self.age_s or 0) > LEGACY_MAX_AGE_S:
            return f"it names no process and is {self.age_s / 3600:.1f} h old"
        same_host = self.host == HOST and (self.pidns is None or self.pidns == PIDNS)
        if same_host and self.pid is not None and not _alive(self.pid, self.started):
            return "its process is gone"
        if self.expiration is not None and self.expiration < _now():
            return f"its lease expired at {self.expiration.isoformat(timespec='seconds')}"
        return None


class LeasedLockManager(LockManager):
    """File locks with holder identity and a renewed lease (see the module docstring).

    One instance per state directory and process; it renews the leases of every lock it
    holds from one daemon thread.
    """

    def __init__(self, lock_files_directory: Path, lease_s: float = LEASE_S) -> None:
        self.lock_files_directory = Path(lock_files_directory).expanduser().resolve()
        self.lease_s = lease_s
        self._held: dict[str, str] = {}  # key -> holder
        self._guard = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._wake = threading.Event()

    # ------------------------------------------------------------------ files
    def _path(self, key: str) -> Path:
        return self.lock_files_directory.joinpath(key).with_suffix(".lock")

    def _read(self, key: str) -> LockRecord | None:
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        age = self._age(path)
        try:
            record = LockRecord.parse(raw)
        except (ValueError, KeyError, TypeError):
            if age is not None and age > UNREADABLE_GRACE_S:
                return LockRecord(holder=f"<unreadable record {raw[:80]!r}>", expiration=_now() - dt.timedelta(seconds=age))
            return LockRecord(holder="<being written>", expiration=None)
        record.age_s = age
        return record

    @staticmethod
    def _age(path: Path) -> float | None:
        try:
            return time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None

    def _create(self, key: str, record: LockRecord) -> bool:
        """Create the lock file with its content in one step; False if it exists."""
        self.lock_files_directory.mkdir(parents=True, exist_ok=True)
        tmp = self.lock_files_directory / f".{key}.{HOST}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_bytes(record.to_json())
        try:
            os.link(tmp, self._path(key))
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _break_if_stale(self, key: str, record: LockRecord) -> bool:
        """Remove a lock whose holder is dead; True when it was (or is now) gone."""
        reason = record.stale_reason()
        if reason is None:
            return False
        path = self._path(key)
        try:
            if LockRecord.parse(path.read_bytes()) != record:
                return True  # replaced meanwhile: look again
        except FileNotFoundError:
            return True
        except (ValueError, KeyError, TypeError):
            pass  # still the unreadable one
        path.unlink(missing_ok=True)
        log.warning("broke the stale lock %s held by %s: %s", path, record.identity(), reason)
        return True

    # ------------------------------------------------------------------ protocol
    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        waited_since = time.monotonic()
        delay = POLL_S[0]
        announced = False
        while True:
            if self._create(key, LockRecord.mine(holder, self.lease_s)):
                self._hold(key, holder)
                return True
            record = self._read(key)
            if record is None or self._break_if_stale(key, record):
                continue
            if record.holder == holder:
                self._hold(key, holder)
                return True
            if acquire_timeout is not None and time.monotonic() - waited_since >= acquire_timeout:
                return False
            if not announced:
                log.info("waiting for %s, which %s holds", self._path(key).name, record.identity())
                announced = True
            time.sleep(delay)
            delay = min(delay * 2, POLL_S[1])

    def release_lock(self, key: str, holder: str) -> None:
        with self._guard:  # not while the renewer rewrites the record
            self._held.pop(key, None)
            record = self._read(key)
            if record is None:
                raise ValueError(f"No lock for transaction with key {key}")
            if record.holder != holder:
                raise ValueError(f"No lock held by {holder} for transaction with key {key}")
            self._path(key).unlink(missing_ok=True)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        record = self._read(key)
        return record is not None and not self._break_if_stale(key, record)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        record = self._read(key)
        return record is not None and record.holder == holder and record.stale_reason() is None

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        started = time.monotonic()
        delay = POLL_S[0]
        while self.is_locked(key):
            if timeout is not None and time.monotonic() - started >= timeout:
                return False
            time.sleep(delay)
            delay = min(delay * 2, POLL_S[1])
        return True

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        return await anyio.to_thread.run_sync(partial(self.acquire_lock, key, holder, acquire_timeout, hold_timeout))

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(partial(self.wait_for_lock, key, timeout))

    # ------------------------------------------------------------------ lease
    def _hold(self, key: str, holder: str) -> None:
        with self._guard:
            self._held[key] = holder
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew_forever, name="lock-lease", daemon=True)
                self._renewer.start()

    def _renew_forever(self) -> None:
        while True:
            self._wake.wait(self.lease_s / 3)
            with self._guard:
                for key, holder in list(self._held.items()):
                    self._renew(key, holder)

    def _renew(self, key: str, holder: str) -> None:
        """Push the lease of a held lock forward (called with ``_guard`` held)."""
        record = self._read(key)
        if record is None or record.holder != holder or record.pid != os.getpid():
            self._held.pop(key, None)
            if record is not None:
                log.warning("lost the lock %s to %s", self._path(key).name, record.identity())
            return
        tmp = self.lock_files_directory / f".{key}.{HOST}.{os.getpid()}.renew"
        tmp.write_bytes(LockRecord.mine(holder, self.lease_s).to_json())
        os.replace(tmp, self._path(key))

    def describe(self, key: str) -> dict[str, Any] | None:
        """The lock record for ``key`` as a dict (for people and tests), or None."""
        record = self._read(key)
        return None if record is None else json.loads(record.to_json())
