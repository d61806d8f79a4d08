"""The publish task and the flow's S3 output, against a real Prefect API and the moto server.

Retry delays are set to zero on the task object (Prefect reads them from it at run time) so
an outage costs seconds here; the retry *decisions* are the task's own.
"""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
from prefect import flow
from prefect.artifacts import Artifact
from s3_server import SECRETS, free_port, make_version, moto_server, s3  # noqa: F401

from bevfusion_ptq.errors import TransientStorageError, VerificationError
from bevfusion_ptq.s3.manifest import load_local_version
from bevfusion_ptq.workdir import state_dir
from tasks.publish import publish as publish_task


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(publish_task, "retries", 1)
    monkeypatch.setattr(publish_task, "retry_delay_seconds", [0])


def _attempts(caplog, version_dir) -> int:
    return sum(1 for r in caplog.records
               if r.getMessage().startswith("publishing to") and f"{version_dir} is intact" in r.getMessage())


def test_publish_task_links_the_version_and_retries_only_outages(
        prefect_api, s3, tmp_path, monkeypatch, caplog, fast_retries):
    caplog.set_level(logging.INFO)
    v1 = make_version(tmp_path / "out", "v1")

    @flow
    def publish_flow(version_dir: str, url: str) -> dict:
        return publish_task(version_dir, url, sse="AES256")

    result = publish_flow(str(v1), s3.url("t"))
    assert result["url"] == s3.url("t", "tiny-test", "v1") and result["latest_updated"]
    link = Artifact.get("published-tiny-test")
    assert link is not None and link.type == "markdown" and s3.url("t", "tiny-test", "v1") in link.data

    # An outage: botocore gives up, the task retries once more, then the flow fails and the
    # log names the local directory, left intact.
    v2 = make_version(tmp_path / "out", "v2", seed=2)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in v2.iterdir()}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(TransientStorageError):
        publish_flow(str(v2), s3.url("t"))
    assert _attempts(caplog, v2) == 2
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in v2.iterdir()}

    # An input error is not retried.
    (v2 / "quantizers.json").write_text("[]\n")
    with pytest.raises(VerificationError):
        publish_flow(str(v2), s3.url("t"))
    assert _attempts(caplog, v2) == 3
    for secret in SECRETS:
        assert secret not in caplog.text and secret not in link.data


@pytest.mark.slow
def test_run_with_s3_output_survives_an_outage(prefect_api, s3, tmp_path, monkeypatch, capsys, caplog, fast_retries):
    """``run --output s3://...``: down -> fails, local copy kept and named; ``publish`` later; up -> works.

    Needs flows/ptq.py to publish through tasks.publish (the flow integration of issue 7).
    """
    from flows.cli import main

    caplog.set_level(logging.INFO)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)  # the CLI then keeps the harness's API
    url = s3.url("runs")
    run = ["run", "--output", url, "--calib-batches", "1", "--device", "cpu", "--eval-samples", "1"]

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    # Down before the run: found by the input checks, before any work.
    assert main(run) == TransientStorageError.exit_code
    outbox = state_dir() / "outbox" / "bevfusion-tiny"
    assert not outbox.exists() and "cannot write to " + url in capsys.readouterr().err
    # Down only by the time the version is published (the write probe got through).
    import bevfusion_ptq.preflight

    monkeypatch.setattr(bevfusion_ptq.preflight, "probe_s3_write", lambda *a, **k: None)
    assert main(run) == TransientStorageError.exit_code
    (version_dir,) = [p for p in outbox.iterdir() if not p.name.startswith(".")]
    load_local_version(version_dir)  # every file still matches its manifest
    said = capsys.readouterr()
    assert str(version_dir) in said.err + said.out + caplog.text
    assert s3.client.list_objects_v2(Bucket=s3.bucket).get("KeyCount", 0) == 0

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.server.endpoint)
    assert main(["publish", str(version_dir), url]) == 0
    latest = json.loads(s3.client.get_object(Bucket=s3.bucket, Key="runs/bevfusion-tiny/latest.json")["Body"].read())
    assert latest["version"] == version_dir.name

    assert main(run) == 0
    assert version_dir.name in capsys.readouterr().out
