"""The temporary Prefect server of a CLI run, tied to the run's life.

With no ``PREFECT_API_URL``, Prefect starts a temporary API server (uvicorn, in a
subprocess) on first use and stops it at interpreter exit. Left at that:

* a run killed with SIGKILL (OOM, pre-emption) never reaches its exit handlers, and the
  server keeps listening on 127.0.0.1 for good;
* Ctrl-C in a terminal goes to the whole process group, server included: it dies first,
  and the interrupted flow then spends minutes failing to report its state to it;
* it sends telemetry out of the machine at every start.

So the CLI starts that server itself, from the main thread, before the flow: in its own
session (a terminal's Ctrl-C reaches only the run, which then reports and stops it), with
the kernel's parent-death signal set to SIGKILL (it dies with the run, whatever ends the
run), with telemetry off, and points ``PREFECT_API_URL`` at it.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import types

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 3.0
STARTUP_TIMEOUT_S = 120  # a busy CI machine needs more than Prefect's 20 s default

TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with(parent: int) -> None:
    """In the server's process, before it runs: SIGKILL it when the run's process ends."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the run died before the signal was armed
        os._exit(1)


def start_temporary_server() -> str:
    """Start the run's Prefect server (own session, dies with us, no telemetry); its API URL.

    Sets ``PREFECT_API_URL`` before Prefect is imported, so every client of this process
    uses that server and Prefect starts no ephemeral one of its own.
    """
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)
    port = _free_port()
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"

    import prefect.server.api.server as server_module

    popen = functools.partial(
        subprocess.Popen, start_new_session=True, preexec_fn=functools.partial(_die_with, os.getpid())
    )
    tied = types.SimpleNamespace(**{**vars(subprocess), "Popen": popen})

    class TiedServer(server_module.SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            # Prefect's own command line, started with our session and parent-death signal.
            real, server_module.subprocess = server_module.subprocess, tied
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = real

        def stop(self) -> None:
            proc = self.server_process
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
            super().stop()

    server = TiedServer(port)
    server.start(timeout=STARTUP_TIMEOUT_S)
    atexit.register(server.stop)  # after Prefect's own handlers: stopped before they run
    return server.api_url
