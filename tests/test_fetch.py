"""Consumers: fetch + verify, refusals, listing, checkpoint download, and the CLI commands."""

from __future__ import annotations

import json

import pytest
from s3_server import SECRETS, free_port, make_version, moto_server, s3  # noqa: F401

from bevfusion_ptq.errors import FetchError, TransientStorageError, VerificationError
from bevfusion_ptq.s3 import download_checkpoint, fetch_version, list_versions, make_client, publish_version
from flows.cli import main


@pytest.fixture
def published(s3, tmp_path):
    """v1 then v2 published under s3://<bucket>/rel/tiny-test."""
    out = tmp_path / "out"
    dirs = {v: make_version(out, v, seed=i) for i, v in enumerate(("v1", "v2"))}
    for d in dirs.values():
        publish_version(d, s3.url("rel"))
    return dirs


def _files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_fetch_latest_and_by_id(s3, published, tmp_path):
    latest = fetch_version(s3.url("rel", "tiny-test"), to=tmp_path / "to")
    assert latest.name == "v2" and _files(latest) == _files(published["v2"])
    older = fetch_version(s3.url("rel", "tiny-test"), "v1", tmp_path / "to")
    assert _files(older) == _files(published["v1"])
    assert sorted(p.name for p in (tmp_path / "to").iterdir()) == ["v1", "v2"]  # no staging left

    # Fetching again reuses the verified copy instead of downloading.
    client, gets = make_client(), []
    client.meta.events.register("before-parameter-build.s3.GetObject", lambda params, **_: gets.append(params["Key"]))
    assert fetch_version(s3.url("rel", "tiny-test"), "v1", tmp_path / "to", client=client) == older
    assert gets == ["rel/tiny-test/v1/manifest.json"]


def test_one_altered_byte_is_refused(s3, published, tmp_path):
    key = "rel/tiny-test/v2/model.pth"
    body = bytearray(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    body[100] ^= 0x01
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=bytes(body))
    with pytest.raises(VerificationError, match="model.pth sha256"):
        fetch_version(s3.url("rel", "tiny-test"), to=tmp_path / "to")
    assert not (tmp_path / "to").exists() or list((tmp_path / "to").iterdir()) == []


def test_missing_object_and_wrong_size_are_refused(s3, published, tmp_path):
    s3.client.delete_object(Bucket=s3.bucket, Key="rel/tiny-test/v2/quantizers.json")
    with pytest.raises(VerificationError, match="quantizers.json is in the manifest but missing"):
        fetch_version(s3.url("rel", "tiny-test"), to=tmp_path / "to")
    s3.client.put_object(Bucket=s3.bucket, Key="rel/tiny-test/v1/config.json", Body=b"{}")
    with pytest.raises(VerificationError, match="config.json has 2 bytes"):
        fetch_version(s3.url("rel", "tiny-test"), "v1", tmp_path / "to")


def test_unfinished_unknown_and_empty_are_refused(s3, published, tmp_path):
    s3.client.delete_object(Bucket=s3.bucket, Key="rel/tiny-test/v1/manifest.json")
    with pytest.raises(FetchError, match="v1 .* is unfinished"):
        fetch_version(s3.url("rel", "tiny-test"), "v1", tmp_path / "to")
    with pytest.raises(FetchError, match="no version v9"):
        fetch_version(s3.url("rel", "tiny-test"), "v9", tmp_path / "to")
    with pytest.raises(FetchError, match="no latest.json"):
        fetch_version(s3.url("rel"), to=tmp_path / "to")  # the prefix, not the model
    with pytest.raises(FetchError, match="refusing version id"):
        fetch_version(s3.url("rel", "tiny-test"), "../v2", tmp_path / "to")


def test_a_manifest_escaping_the_target_is_refused(s3, published, tmp_path):
    manifest = json.loads((published["v2"] / "manifest.json").read_text())
    manifest["files"].append({"name": "../../escape.txt", "size": 1, "sha256": "0" * 64})
    s3.client.put_object(Bucket=s3.bucket, Key="rel/tiny-test/v2/manifest.json", Body=json.dumps(manifest).encode())
    with pytest.raises(FetchError, match="escape.txt"):
        fetch_version(s3.url("rel", "tiny-test"), to=tmp_path / "a" / "b")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "a").exists()


def test_list_versions_with_created_at_and_inputs(s3, published):
    s3.client.put_object(Bucket=s3.bucket, Key="rel/tiny-test/v3/model.pth", Body=b"partial")
    rows = list_versions(s3.url("rel", "tiny-test"))
    assert [(r["version"], r["complete"], r["latest"]) for r in rows] == [
        ("v1", True, False), ("v2", True, True), ("v3", False, False)]
    assert rows[0]["created_at"] < rows[1]["created_at"]
    assert rows[1]["inputs"]["calibration"]["method"] == "mse"
    assert rows[1]["summary"].startswith("checkpoint 000000000000") and "calib mse x2" in rows[1]["summary"]


def test_download_checkpoint_reuses_an_unchanged_object(s3, tmp_path):
    s3.client.put_object(Bucket=s3.bucket, Key="ckpts/model.pth", Body=b"weights-1")
    path = download_checkpoint(s3.url("ckpts", "model.pth"), tmp_path / "cache")
    assert path == tmp_path / "cache" / s3.bucket / "ckpts" / "model.pth" and path.read_bytes() == b"weights-1"
    client, gets = make_client(), []
    client.meta.events.register("before-parameter-build.s3.GetObject", lambda params, **_: gets.append(1))
    assert download_checkpoint(s3.url("ckpts", "model.pth"), tmp_path / "cache", client=client) == path
    assert gets == []
    s3.client.put_object(Bucket=s3.bucket, Key="ckpts/model.pth", Body=b"weights-2")
    assert download_checkpoint(s3.url("ckpts", "model.pth"), tmp_path / "cache").read_bytes() == b"weights-2"
    with pytest.raises(FetchError, match="no object"):
        download_checkpoint(s3.url("ckpts", "other.pth"), tmp_path / "cache")


def test_cli_publish_list_fetch(s3, tmp_path, capsys, monkeypatch):
    v1 = make_version(tmp_path / "out", "v1")
    assert main(["publish", str(v1), s3.url("cli")]) == 0
    assert "tiny-test v1 published to " + s3.url("cli", "tiny-test", "v1") in capsys.readouterr().out
    assert main(["publish", str(v1), s3.url("cli")]) == 0
    assert "already published" in capsys.readouterr().out

    assert main(["list", s3.url("cli", "tiny-test")]) == 0
    listing = capsys.readouterr().out
    assert listing.startswith("* v1 ") and "calib mse x2" in listing
    assert main(["list", s3.url("cli", "tiny-test"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["version"] == "v1"

    assert main(["fetch", s3.url("cli", "tiny-test"), "--to", str(tmp_path / "got")]) == 0
    assert f"fetched and verified {tmp_path / 'got' / 'v1'}" in capsys.readouterr().out
    assert main(["fetch", s3.url("cli", "tiny-test"), "--to", str(tmp_path / "got"), "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "path": str(tmp_path / "got" / "v1"), "version": "v1", "url": s3.url("cli", "tiny-test")}

    # The explicit endpoint option works without AWS_ENDPOINT_URL_S3.
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert main(["fetch", s3.url("cli", "tiny-test"), "--version", "v1", "--to", str(tmp_path / "got2"),
                 "--endpoint-url", s3.server.endpoint]) == 0


def test_cli_errors_are_one_line_with_their_exit_code(s3, tmp_path, capsys, monkeypatch):
    v1 = make_version(tmp_path / "out", "v1")
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert main(["publish", str(v1), s3.url("e"), "--endpoint-url", dead]) == TransientStorageError.exit_code
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bevfusion-ptq: error: ")]
    assert len(err) == 1 and "unreachable" in err[0] and str(v1) in err[0]

    assert main(["fetch", s3.url("e", "tiny-test"), "--to", str(tmp_path / "x")]) == FetchError.exit_code
    assert "no latest.json" in capsys.readouterr().err
    publish_version(v1, s3.url("e"))
    s3.client.put_object(Bucket=s3.bucket, Key="e/tiny-test/v1/model.pth", Body=b"tampered")
    assert main(["fetch", s3.url("e", "tiny-test"), "--to", str(tmp_path / "x")]) == VerificationError.exit_code
    assert "model.pth has 8 bytes" in capsys.readouterr().err
    assert main(["publish", str(v1), "gs://elsewhere/x"]) == 3  # ConfigError


def test_no_credentials_or_signatures_in_logs(s3, tmp_path, caplog, capfd, monkeypatch):
    """Everything at DEBUG (as with -v), success and failure paths: no secret appears."""
    import logging

    caplog.set_level(logging.DEBUG)
    v1 = make_version(tmp_path / "out", "v1")
    assert main(["-v", "publish", str(v1), s3.url("s")]) == 0
    assert main(["-v", "list", s3.url("s", "tiny-test")]) == 0
    assert main(["-v", "fetch", s3.url("s", "tiny-test"), "--to", str(tmp_path / "f")]) == 0
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert main(["-v", "publish", str(v1), s3.url("s"), "--endpoint-url",
                 f"http://user:pw@127.0.0.1:{free_port()}"]) != 0
    download_checkpoint(s3.url("s", "tiny-test", "v1", "model.pth"), tmp_path / "c")
    out, err = capfd.readouterr()
    text = caplog.text + out + err
    assert "fetched and verified" in text and "unreachable" in text
    for secret in (*SECRETS, "Signature=", "X-Amz-Signature", "X-Amz-Credential", "user:pw"):
        assert secret not in text, secret
