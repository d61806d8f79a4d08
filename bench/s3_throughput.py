"""Upload and download throughput of a 200 MB file on loopback, ours vs plain boto3.

Starts a moto server on 127.0.0.1 (as the tests do) and, in the same run, times:

- ours: ``publish_version`` (local sha256 check, managed multipart upload with checksums,
  HEAD verification, manifest, latest) and ``fetch_version`` (download + size/sha256 check);
- plain: boto3's ``upload_file`` / ``download_file`` with boto3's default TransferConfig.

Usage: ``.venv/bin/python bench/s3_throughput.py [--mb 200] [--repeat 3]``. moto is a Python
server, so the figures measure the client stack against a slow server, not S3 itself.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from s3_server import MotoServer, aws_env  # noqa: E402


def make_version_dir(root: Path, mb: int) -> Path:
    vdir = root / "bench-model" / "bench1"
    vdir.mkdir(parents=True)
    path, sha = vdir / "model.pth", hashlib.sha256()
    with open(path, "wb") as fh:
        for _ in range(mb):
            chunk = os.urandom(1_000_000)
            sha.update(chunk)
            fh.write(chunk)
    manifest = {"version": "bench1", "model": "bench-model", "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                "files": [{"name": "model.pth", "size": path.stat().st_size, "sha256": sha.hexdigest()}]}
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    return vdir


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="s3bench-"))
    server = MotoServer(work / "moto.log")
    server.start()
    try:
        os.environ.update(aws_env(server.endpoint, work))
        import boto3

        from bevfusion_ptq.s3 import fetch_version, make_client, publish_version, transfer_config

        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        ours_client = make_client()
        vdir = make_version_dir(work / "src", args.mb)
        src = vdir / "model.pth"
        size_mb = src.stat().st_size / 1e6
        ours = transfer_config()
        names = ("ours up", "plain up", "plain+cfg up", "ours down", "plain down", "plain+cfg down")
        times: dict[str, list[float]] = {k: [] for k in names}
        for i in range(args.repeat):
            dest = work / f"dl{i}"
            times["ours up"].append(timed(lambda: publish_version(vdir, f"s3://bench/ours{i}", client=ours_client)))
            times["plain up"].append(timed(lambda: client.upload_file(str(src), "bench", f"plain{i}/model.pth")))
            times["plain+cfg up"].append(timed(lambda: client.upload_file(str(src), "bench", f"cfg{i}/model.pth",
                                                                          Config=ours)))
            times["ours down"].append(timed(lambda: fetch_version(f"s3://bench/ours{i}/bench-model", to=dest,
                                                                  client=ours_client)))
            times["plain down"].append(timed(lambda: client.download_file("bench", f"plain{i}/model.pth",
                                                                          str(work / "plain.bin"))))
            times["plain+cfg down"].append(timed(lambda: client.download_file("bench", f"cfg{i}/model.pth",
                                                                              str(work / "plain.bin"), Config=ours)))
            shutil.rmtree(dest)
            for key in (f"ours{i}/bench-model/bench1/model.pth", f"plain{i}/model.pth", f"cfg{i}/model.pth"):
                client.delete_object(Bucket="bench", Key=key)
        print(f"{size_mb:.0f} MB file, moto server on 127.0.0.1, {args.repeat} runs each (median, best)")
        print(f"ours:  multipart >= {ours.multipart_threshold >> 20} MiB, {ours.multipart_chunksize >> 20} MiB parts, "
              f"{ours.max_concurrency} threads, checksums + HEAD + sha256 verification")
        print("plain: boto3 defaults (multipart >= 8 MiB, 8 MiB parts, 10 threads); plain+cfg: our TransferConfig")
        for name, values in times.items():
            print(f"  {name:<15} {size_mb / statistics.median(values):7.1f} MB/s median  "
                  f"{size_mb / min(values):7.1f} MB/s best  ({statistics.median(values):.2f} s)")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
