"""Re-runs with nothing to compute: find the published version from the inputs alone.

A fully cached run of the flow still imports torch and the model zoo, starts Prefect and
walks every stage to learn that each is cached: 18 s on a CPU for bevfusion-tiny, most of it
start-up. Yet whether the final version exists is decided by the same identities the stage
keys are built from (:mod:`bevfusion_ptq.pipeline.keys`): the checkpoint (its file stamp, or
the seed of a random one), the config file, the data's info file stamp (or the generated
tree), the parameters each stage reads, and the code. After each run the CLI records
``identity -> published version`` here; a later run with the same identity checks that the
version is still where it was published, and is done.

Stricter than the stage keys, never looser: every parameter except the two that only
change how a run happens (device, calibration-state interval) is part of the identity, and
so is every source file of the package (the stage keys hash only the stage functions). A
config that inherits (``_base_``) or a checkpoint on S3 is not identified cheaply; those
runs take the flow. Only light modules are imported (boto3 for an s3:// output).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from bevfusion_ptq import __version__
from bevfusion_ptq.atomic import write_text
from bevfusion_ptq.config_files import config_path
from bevfusion_ptq.hashing import data_sha256
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.preflight import INFO_NAME
from bevfusion_ptq.workdir import state_dir

log = logging.getLogger(__name__)

# Parameters that decide how a run happens, not what it produces (see pipeline.keys).
_HOW_NOT_WHAT = {"device", "calib_checkpoint_every"}
_CODE_ROOTS = ("bevfusion_ptq", "tasks", "flows")


@functools.cache
def code_digest() -> str:
    """sha256 over every Python source of the package and its Prefect layers (a few ms)."""
    top = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(__version__.encode())
    for root in _CODE_ROOTS:
        for path in sorted((top / root).rglob("*.py")):
            digest.update(str(path.relative_to(top)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def rerun_key(params: PTQParams) -> str | None:
    """The identity of everything the run's version depends on; None when not cheap to know."""
    source = config_path(params.config).read_bytes()
    if b"_base_" in source or (params.checkpoint or "").startswith("s3://"):
        return None
    try:
        checkpoint = _stamp(Path(params.checkpoint)) if params.checkpoint else {"random": True}
        data = _stamp(Path(params.data_root) / INFO_NAME) if params.data_root else {"generated": True}
    except OSError:
        return None
    return data_sha256({
        "code": code_digest(),
        "config": hashlib.sha256(source).hexdigest(),
        "checkpoint": checkpoint,
        "data": data,
        "params": params.model_dump(mode="json", exclude=_HOW_NOT_WHAT),
        "state": str(state_dir()),
    })


def _record_path(key: str) -> Path:
    return state_dir() / "published" / f"{key}.json"


def remember(params: PTQParams, result: dict[str, Any]) -> None:
    """Record the version a finished run published, for :func:`find_published`."""
    key = rerun_key(params)
    if key is None:
        return
    record = {
        "url": result["url"], "path": result["path"], "version": result["version"],
        "model": params.model_name, "flow_run_id": str(result.get("flow_run_id")),
        "recorded_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    write_text(_record_path(key), json.dumps(record, indent=2) + "\n")


def find_published(params: PTQParams, *, client: Any = None) -> dict[str, Any] | None:
    """The recorded version of a run with these inputs, if it is still published; else None."""
    key = rerun_key(params)
    path = _record_path(key) if key else None
    if path is None or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    if not _still_published(record["url"], client=client):
        log.info("version %s is no longer at %s; running the flow", record["version"], record["url"])
        return None
    return record


def _still_published(url: str, *, client: Any = None) -> bool:
    """The version's manifest (written last by a publish) is still there."""
    if not url.startswith("s3://"):
        return (Path(url) / "manifest.json").is_file()
    from bevfusion_ptq.s3 import make_client, parse_url
    from bevfusion_ptq.s3.client import translated

    loc = parse_url(url)
    s3 = client or make_client()
    try:
        with translated(f"checking {url}"):
            s3.head_object(Bucket=loc.bucket, Key=loc.key("manifest.json"))
    except Exception:  # noqa: BLE001 - gone, or unreadable: the flow will find out and say
        return False
    return True
