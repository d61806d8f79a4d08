"""Publishing against a real S3 protocol server (moto in server mode, over HTTP).

Interruptions and competing writers are produced with botocore's own event hooks on the
client that publishes: the requests still go to the server, and the server's answers
(412 on a stale ETag, objects present or not) are what the assertions check.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
from s3_server import add_file, free_port, make_version, s3, moto_server  # noqa: F401

from bevfusion_ptq.errors import FetchError, TransientStorageError, VerificationError
from bevfusion_ptq.s3 import fetch_version, make_client, publish_version, transfer_config
from bevfusion_ptq.s3.manifest import MULTIPART_CHECKSUM, digests


def _latest(s3, prefix: str, model: str = "tiny-test") -> dict:
    return json.loads(s3.client.get_object(Bucket=s3.bucket, Key=f"{prefix}/{model}/latest.json")["Body"].read())


def _keys(s3) -> set[str]:
    return {o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])}


def _snapshot(version_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(version_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(version_dir.rglob("*")) if p.is_file()}


def _count_calls(client, operation: str, calls: list[dict]) -> None:
    client.meta.events.register(f"before-parameter-build.s3.{operation}", lambda params, **_: calls.append(params))


def _race_before_put(client, key_suffix: str, competitor) -> tuple[list, list]:
    """Run ``competitor()`` once, just before ``client`` sends its first PutObject of a key
    ending in ``key_suffix``: another run wins the race in between. Returns (what the
    competitor returned, the condition header of every such PutObject of ours)."""
    fired, conditions = [], []

    def hook(params, **_):
        if params["Key"].endswith(key_suffix):
            conditions.append(params.get("IfMatch") or params.get("IfNoneMatch"))
            if not fired:
                fired.append(competitor())

    client.meta.events.register("before-parameter-build.s3.PutObject", hook)
    return fired, conditions


def test_publish_then_fetch_verifies_every_file(s3, tmp_path):
    v1 = make_version(tmp_path / "out", "v1")
    result = publish_version(v1, s3.url("releases"))
    assert (result.version, result.model, result.reused, result.latest_updated) == ("v1", "tiny-test", False, True)
    assert result.url == s3.url("releases", "tiny-test", "v1")
    assert result.manifest_key == "releases/tiny-test/v1/manifest.json"

    manifest = json.loads((v1 / "manifest.json").read_text())
    assert _keys(s3) == {f"releases/tiny-test/v1/{f['name']}" for f in manifest["files"]} | {
        "releases/tiny-test/v1/manifest.json", "releases/tiny-test/latest.json"}
    assert _latest(s3, "releases") == {
        "model": "tiny-test", "version": "v1", "manifest": "v1/manifest.json", "created_at": manifest["created_at"]}
    head = s3.client.head_object(Bucket=s3.bucket, Key="releases/tiny-test/v1/model.pth")
    assert head["Metadata"]["sha256"] == next(f["sha256"] for f in manifest["files"] if f["name"] == "model.pth")

    fetched = fetch_version(s3.url("releases", "tiny-test"), to=tmp_path / "fetched")
    assert fetched == tmp_path / "fetched" / "v1"
    assert _snapshot(fetched) == _snapshot(v1)


def test_republishing_the_same_version_writes_nothing(s3, tmp_path):
    v1 = make_version(tmp_path / "out", "v1")
    publish_version(v1, s3.url("p"))
    client, puts = make_client(), []
    for op in ("PutObject", "CreateMultipartUpload"):
        _count_calls(client, op, puts)
    again = publish_version(v1, s3.url("p"), client=client)
    assert again.reused and not again.latest_updated and again.version == "v1"
    assert puts == []
    assert len([k for k in _keys(s3) if k.endswith("manifest.json")]) == 1


def test_concurrent_publishers_leave_latest_on_the_newest(s3, tmp_path):
    """Four runs publish at once, then two more (one older) race: latest ends on the newest."""
    out = tmp_path / "out"
    dirs = [make_version(out, f"v{i}", seed=i) for i in range(6)]  # created_at increases with i

    def race(batch: list[Path]) -> list:
        barrier, results = threading.Barrier(len(batch)), [None] * len(batch)

        def run(i: int) -> None:
            client = make_client()
            barrier.wait()
            results[i] = publish_version(batch[i], s3.url("c"), client=client)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batch))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert all(r is not None for r in results), "a publisher failed"
        return results

    race(dirs[:4])
    assert _latest(s3, "c")["version"] == "v3"
    race([dirs[5], dirs[4]])  # v4 is older than v5: it must not win even when it finishes last
    latest = _latest(s3, "c")
    assert latest["version"] == "v5" and latest["manifest"] == "v5/manifest.json"
    for i in range(6):
        assert f"c/tiny-test/v{i}/manifest.json" in _keys(s3)
    assert fetch_version(s3.url("c", "tiny-test"), to=tmp_path / "f").name == "v5"


@pytest.mark.parametrize("competitor_is_newer", [True, False])
def test_latest_swap_rereads_after_a_412(s3, tmp_path, competitor_is_newer):
    """Another run moves latest between our read and our conditional write."""
    out = tmp_path / "out"
    base = make_version(out, "v0", seed=0)
    first, second = make_version(out, "va", seed=1), make_version(out, "vb", seed=2)
    ours, theirs = (first, second) if competitor_is_newer else (second, first)
    publish_version(base, s3.url("r"))  # so our swap is an IfMatch on v0's ETag
    client = make_client()
    fired, latest_puts = _race_before_put(client, "latest.json", lambda: publish_version(theirs, s3.url("r")))
    result = publish_version(ours, s3.url("r"), client=client)
    assert fired[0].latest_updated
    newest = second.name
    assert _latest(s3, "r")["version"] == newest
    assert result.latest_updated == (not competitor_is_newer)
    # One conditional write refused; re-read; a second write only when ours is the newer one.
    assert len(latest_puts) == (1 if competitor_is_newer else 2)
    assert latest_puts[0] != latest_puts[-1] or len(latest_puts) == 1


def test_first_publish_races_on_a_missing_latest(s3, tmp_path):
    """No latest.json yet: both create it with IfNoneMatch='*'; exactly one wins, the newer stays."""
    older, newer = make_version(tmp_path / "out", "va", seed=1), make_version(tmp_path / "out", "vb", seed=2)
    client = make_client()
    fired, conditions = _race_before_put(client, "latest.json", lambda: publish_version(newer, s3.url("n")))
    result = publish_version(older, s3.url("n"), client=client)
    assert fired and conditions[0] == "*"
    assert not result.latest_updated and _latest(s3, "n")["version"] == "vb"


class Crash(Exception):
    """The publishing process dying mid-upload."""


def test_interrupted_upload_leaves_no_manifest_and_latest_unchanged(s3, tmp_path):
    out = tmp_path / "out"
    v1, v2 = make_version(out, "v1", seed=1), make_version(out, "v2", seed=2)
    publish_version(v1, s3.url("i"))
    client, puts = make_client(), []

    def crash_after_two(params, **_):
        puts.append(params["Key"])
        if len(puts) > 2:
            raise Crash("killed")

    client.meta.events.register("before-parameter-build.s3.PutObject", crash_after_two)
    with pytest.raises(Crash):
        publish_version(v2, s3.url("i"), client=client)
    uploaded = {k for k in _keys(s3) if k.startswith("i/tiny-test/v2/")}
    assert len(uploaded) == 2 and "i/tiny-test/v2/manifest.json" not in uploaded
    assert _latest(s3, "i")["version"] == "v1"
    assert fetch_version(s3.url("i", "tiny-test"), to=tmp_path / "f").name == "v1"
    with pytest.raises(FetchError, match="unfinished"):
        fetch_version(s3.url("i", "tiny-test"), "v2", tmp_path / "f")

    # A later publish resumes: the two objects already holding the right bytes are skipped.
    client2, puts2 = make_client(), []
    _count_calls(client2, "PutObject", puts2)
    assert publish_version(v2, s3.url("i"), client=client2).latest_updated
    files = {f"i/tiny-test/v2/{f['name']}" for f in json.loads((v2 / "manifest.json").read_text())["files"]}
    assert {p["Key"] for p in puts2} == (files - uploaded) | {"i/tiny-test/v2/manifest.json", "i/tiny-test/latest.json"}


def test_file_over_the_multipart_threshold(s3, tmp_path):
    v1 = make_version(tmp_path / "out", "v1")
    add_file(v1, "plots/big.bin", os.urandom(11 * 1024 * 1024 + 123))
    tc = transfer_config(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    client, parts = make_client(), []
    _count_calls(client, "UploadPart", parts)
    publish_version(v1, s3.url("m"), transfer_config=tc, client=client)
    assert len(parts) == 3
    head = s3.client.head_object(Bucket=s3.bucket, Key="m/tiny-test/v1/plots/big.bin", ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == 11 * 1024 * 1024 + 123
    crc = digests(v1 / "plots" / "big.bin")[2]
    assert head[f"Checksum{MULTIPART_CHECKSUM}"] == base64.b64encode(crc.to_bytes(4, "big")).decode()
    fetched = fetch_version(s3.url("m", "tiny-test"), to=tmp_path / "f", transfer_config=tc)
    assert _snapshot(fetched) == _snapshot(v1)


def test_server_down_fails_cleanly_then_a_later_publish_succeeds(s3, tmp_path):
    v1 = make_version(tmp_path / "out", "v1")
    before = _snapshot(v1)
    down = make_client(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=2)
    with pytest.raises(TransientStorageError) as err:
        publish_version(v1, s3.url("d"), client=down)
    message = str(err.value)
    assert "unreachable" in message and str(v1) in message and f"bevfusion-ptq publish {v1}" in message
    assert _snapshot(v1) == before
    assert _keys(s3) == set()
    assert publish_version(v1, s3.url("d")).latest_updated


def test_local_files_are_verified_before_any_upload(s3, tmp_path):
    v1 = make_version(tmp_path / "out", "v1")
    data = bytearray((v1 / "state_dict.pth").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (v1 / "state_dict.pth").write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="state_dict.pth sha256"):
        publish_version(v1, s3.url("x"))
    assert _keys(s3) == set()


@pytest.mark.parametrize("sse,kms", [("AES256", None), ("aws:kms", "alias/bevfusion-test")])
def test_server_side_encryption_on_every_object(s3, tmp_path, sse, kms):
    v1 = make_version(tmp_path / "out", "v1")
    publish_version(v1, s3.url("e"), sse=sse, kms_key_id=kms)
    for key in _keys(s3):
        head = s3.client.head_object(Bucket=s3.bucket, Key=key)
        assert head["ServerSideEncryption"] == sse, key
        assert head.get("SSEKMSKeyId") == kms, key


def test_local_root_has_the_same_layout(tmp_path):
    out, root = tmp_path / "out", tmp_path / "published"
    v1, v2 = make_version(out, "v1", seed=1), make_version(out, "v2", seed=2)
    assert publish_version(v2, str(root)).latest_updated
    assert not publish_version(v1, str(root)).latest_updated  # older: latest stays on v2
    assert publish_version(v1, str(root)).reused
    latest = json.loads((root / "tiny-test" / "latest.json").read_text())
    assert latest["version"] == "v2" and (root / "tiny-test" / latest["manifest"]).is_file()
    assert _snapshot(root / "tiny-test" / "v1") == _snapshot(v1)
    assert fetch_version(str(root / "tiny-test"), "v1", tmp_path / "f").name == "v1"


def test_local_in_place_publish_moves_latest_concurrently(tmp_path):
    """The default local output: versions saved in place, latest moved by several threads."""
    out = tmp_path / "out"
    dirs = [make_version(out, f"v{i}", seed=i) for i in range(4)]
    results = [None] * 4

    def run(i: int) -> None:
        results[i] = publish_version(dirs[i], str(out))

    threads = [threading.Thread(target=run, args=(i,)) for i in (3, 0, 2, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r is not None and not r.reused for r in results)
    assert json.loads((out / "tiny-test" / "latest.json").read_text())["version"] == "v3"
    leftovers = [p.name for p in (out / "tiny-test").iterdir() if p.name.startswith(".latest.json.")]
    assert leftovers == [".latest.json.lock"]


def test_same_version_published_concurrently_is_written_once(s3, tmp_path):
    """Two runs with identical inputs: the second's manifest write is refused, nothing breaks."""
    v1 = make_version(tmp_path / "a", "v1")
    twin = tmp_path / "b" / "tiny-test" / "v1"
    shutil.copytree(v1, twin)
    client = make_client()
    fired, conditions = _race_before_put(client, "v1/manifest.json", lambda: publish_version(twin, s3.url("s")))
    result = publish_version(v1, s3.url("s"), client=client)
    assert conditions[0] == "*"
    assert not fired[0].reused and result.reused and _latest(s3, "s")["version"] == "v1"
    assert fetch_version(s3.url("s", "tiny-test"), to=tmp_path / "f").name == "v1"


def test_same_version_with_other_bytes_keeps_the_published_copy(s3, tmp_path, caplog):
    v1 = make_version(tmp_path / "a", "v1", seed=1)
    publish_version(v1, s3.url("k"))
    rebuilt = make_version(tmp_path / "b", "v1", seed=2)  # same id, other weights
    with caplog.at_level(logging.WARNING):
        assert publish_version(rebuilt, s3.url("k")).reused
    assert "already published with other file hashes" in caplog.text
    fetched = fetch_version(s3.url("k", "tiny-test"), to=tmp_path / "f")
    assert _snapshot(fetched) == _snapshot(v1)
