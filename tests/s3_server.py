"""A real S3 protocol server for tests: ``python -m moto.server`` on 127.0.0.1, over HTTP.

The server runs as a subprocess on a free port, is polled until it answers, and is stopped
by its PID. Tests speak to it with plain boto3 through ``AWS_ENDPOINT_URL_S3``, the same
way users point the CLI at an S3-compatible store. Fake but distinctive credentials make
"no secret in the logs" checkable.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

ACCESS_KEY = "AKIATESTFAKE7Q2XKEYID"
SECRET_KEY = "fake-secret/DO-NOT-LOG+8f3kq0ZxY"
SESSION_TOKEN = "fake-session-token-DO-NOT-LOG-5c1e"
SECRETS = (ACCESS_KEY, SECRET_KEY, SESSION_TOKEN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """One moto server process; ``stop()`` kills exactly the process ``start()`` made."""

    def __init__(self, log_path: Path, port: int | None = None) -> None:
        self.log_path, self.port = log_path, port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint} within {timeout}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def aws_env(endpoint: str, tmp: Path) -> dict[str, str]:
    """The standard AWS variables, isolated from the user's own profiles."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_SESSION_TOKEN": SESSION_TOKEN,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class S3:
    """One test's bucket on the shared server, with its env already applied."""

    server: MotoServer
    bucket: str
    client: object
    env: dict[str, str]

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


@pytest.fixture
def s3(moto_server, monkeypatch, tmp_path) -> S3:
    """A fresh bucket per test and the AWS env pointing at the moto server."""
    env = aws_env(moto_server.endpoint, tmp_path)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    return S3(moto_server, bucket, client, env)


def make_version(root: Path, version: str, *, model: str = "tiny-test", seed: int = 0) -> Path:
    """A real version directory from ``save_artifacts`` on a tiny module (no calibration)."""
    import torch
    from torch import nn

    from bevfusion_ptq.artifacts import save_artifacts

    torch.manual_seed(seed)
    saved = save_artifacts(
        nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)),
        [{"name": "0._input_quantizer", "enabled": True, "amax": 1.5}],
        root, model_name=model, version=version,
        inputs={"checkpoint_sha256": f"{seed:064x}", "config": "tiny", "config_sha256": "c" * 64,
                "dataset_fingerprint": "d" * 64, "calibration": {"method": "mse", "batches": 2}},
        extra_files={"config.json": {"seed": seed}},
    )
    return saved.path


def add_file(version_dir: Path, name: str, data: bytes) -> None:
    """Add a file (``name`` may hold a ``/``) and list it in the manifest, as the flow would."""
    import hashlib
    import json

    path = version_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    manifest["files"].append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (version_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
