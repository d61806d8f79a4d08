"""A real Prefect server and its workers on 127.0.0.1, for the deployment and UI tests.

Everything here is started as a subprocess in its own session and stopped by its PID (its
process group is that PID, so a worker's flow-run children go with it). Every subprocess
gets the same environment: the server's API, a temporary PREFECT_HOME and
BEVFUSION_PTQ_HOME, the project's .venv first on PATH, and short polling intervals.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PREFECT = str(VENV_BIN / "prefect")
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """A background process in its own session, output to ``log``."""
    fh = open(log, "ab")
    try:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        fh.close()


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process we started, then SIGKILL its process group (id = its PID)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers: flow-run children of a worker
    except ProcessLookupError:
        pass
    proc.wait()


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"<no {path}>"


@dataclass
class Server:
    """A running server: its URLs, the environment its clients use, and its log."""

    url: str
    env: dict[str, str]
    root: Path
    log: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return self.url + "/api"

    def run(self, *args: str, check: bool = True, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
        """A command in the server's environment (cwd: the repository root)."""
        proc = subprocess.run(list(args), cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def run_all(self, *commands: list[str], timeout: float = 300) -> None:
        """Independent commands at once (each CLI call pays Prefect's import time)."""
        procs = [(c, subprocess.Popen(c, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                 for c in commands]
        for cmd, proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise AssertionError(f"{cmd} exited {proc.returncode}\n{out[-4000:]}")

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """A long-running process (worker, serve) stopped with the server."""
        proc = start(list(args), {**self.env, **(env or {})}, self.root / f"{name}.log")
        self.procs.append(proc)
        return proc


def server_env(root: Path, api_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_PROFILES_PATH=str(root / "prefect-home" / "profiles.toml"),
        PREFECT_API_URL=api_url,
        # The UI asks the server where the API is; without this it says port 4200.
        PREFECT_UI_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_RUNNER_POLL_FREQUENCY="2",
        BEVFUSION_PTQ_HOME=str(root / "state"),
        PYTHONUNBUFFERED="1",
    )
    return env


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout}s:\n{tail(log)}")


@contextmanager
def prefect_server(root: Path, meanwhile: Callable[[Server], None] | None = None) -> Iterator[Server]:
    """``prefect server start`` on a free port with its own PREFECT_HOME; stopped on exit.

    ``meanwhile`` runs while the server boots (it takes 10-20 s on 2 cores).
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = server_env(root, url + "/api")
    log = root / "server.log"
    proc = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    server = Server(url=url, env=env, root=root, log=log)
    try:
        if meanwhile:
            meanwhile(server)
        wait_healthy(url, proc, log)
        yield server
    finally:
        for p in reversed(server.procs):
            stop(p)
        stop(proc)


def client_settings(server: Server) -> Any:
    """Settings context that points this test process's Prefect client at ``server``."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: server.api_url})


def wait_for_run(client: Any, run_id: Any, timeout: float = 420, logs: list[Path] | None = None) -> Any:
    """Poll a flow run until it is terminal; fail with the logs if it does not get there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state and run.state.type.value in TERMINAL:
            return run
        time.sleep(1)
    detail = "\n".join(tail(p) for p in logs or [])
    raise TimeoutError(f"flow run {run_id} not finished after {timeout}s (state {run.state}):\n{detail}")
