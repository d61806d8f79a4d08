"""Checks of a run's inputs that take a second, made before any work starts.

Each failure is one of the package's errors with a one-line message, raised before a
Prefect server, a model or a dataset is touched: a missing checkpoint found after minutes of
set-up, or an unwritable bucket found after calibration, costs the user the whole run.
Only light modules are imported here (no torch, mmdet or spconv); S3 checks import boto3.

What is checked:

- the config: a shipped name or a readable ``.py`` file that compiles and assigns
  ``model`` and ``data`` (or inherits them through ``_base_``);
- the checkpoint: a readable file, or an s3:// object that exists;
- the data root: a readable directory holding the info file (and, for
  ``--sensitivity-metric nds|map``, the val info file and the nuScenes tables);
- the output: a local directory that can be created, or an s3:// location where a probe
  object can be written and deleted (reachability, credentials and write permission at once).

The URL scheme, bucket name and encryption options are checked by
:class:`~bevfusion_ptq.params.PTQParams` itself.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from bevfusion_ptq.config_files import config_path
from bevfusion_ptq.errors import CheckpointError, ConfigError, DatasetError
from bevfusion_ptq.params import PTQParams

log = logging.getLogger(__name__)

INFO_NAME = "nuscenes_infos_train.pkl"  # bevfusion_ptq.data.calibration_set.DEFAULT_INFO_NAME
VAL_INFO_NAME = "nuscenes_infos_val.pkl"  # bevfusion_ptq.pipeline.heldout.VAL_INFO_NAME


def check_inputs(params: PTQParams, *, client: Any = None) -> None:
    """Raise the first input problem of ``params`` as a one-line :class:`PTQError`."""
    check_config(params.config)
    if params.checkpoint:
        check_checkpoint(params.checkpoint, client=client)
    if params.data_root is not None:
        check_data_root(params.data_root)
        check_score_tables(params)
    check_output(params, client=client)


def check_config(name_or_path: str) -> Path:
    """The config file exists, is readable and is Python that assigns ``model`` and ``data``.

    mmengine parses it for real in the first stage; compiling it here catches the typos
    without importing mmengine (and torch with it).
    """
    path = config_path(name_or_path)
    try:
        source = path.read_text()
        if path.suffix != ".py":
            sections = set(json.loads(source)) if path.suffix == ".json" else {"model", "data"}
            tree = None
        else:
            tree = ast.parse(source, filename=str(path))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except SyntaxError as exc:
        raise ConfigError(f"config {path} is not valid Python: line {exc.lineno}: {exc.msg}") from None
    except ValueError as exc:
        raise ConfigError(f"config {path} is not valid JSON: {exc}") from None
    if tree is None:
        missing = [s for s in ("model", "data") if s not in sections]
        if missing:
            raise ConfigError(f"config {path} lacks the section(s) {missing}")
        return path
    assigned = {
        target.id
        for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    missing = [s for s in ("model", "data") if s not in assigned]
    if missing and "_base_" not in assigned:
        raise ConfigError(f"config {path} lacks the section(s) {missing}")
    return path


def _readable_file(path: Path, what: str, error: type[Exception]) -> None:
    if not path.exists():
        raise error(f"{what} not found: {path}")
    if not path.is_file():
        raise error(f"{what} is not a file: {path}")
    if not os.access(path, os.R_OK):
        raise error(f"{what} is not readable: {path}")


def check_checkpoint(source: str, *, client: Any = None) -> None:
    if source.startswith("s3://"):
        from bevfusion_ptq.s3 import make_client, parse_url
        from bevfusion_ptq.s3.client import translated

        loc = parse_url(source)
        with translated(f"checkpoint {source}", CheckpointError):
            (client or make_client()).head_object(Bucket=loc.bucket, Key=loc.prefix)
        return
    _readable_file(Path(source).expanduser(), "checkpoint", CheckpointError)


def check_data_root(root: str) -> None:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"data root {'is not a directory' if path.exists() else 'not found'}: {path}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DatasetError(f"data root is not readable: {path}")
    _readable_file(path / INFO_NAME, "info file", DatasetError)


def check_score_tables(params: PTQParams) -> None:
    """``--sensitivity-metric nds|map`` scores held-out val keyframes with nuscenes-devkit: the
    data root needs the val info file and the dataset's JSON tables. (The generated tree has both.)"""
    if params.sensitivity_metric not in ("nds", "map"):
        return
    root = Path(params.data_root).expanduser()
    why = f"--sensitivity-metric {params.sensitivity_metric} scores val keyframes with nuscenes-devkit"
    _readable_file(root / VAL_INFO_NAME, f"val info file ({why})", DatasetError)
    folders = [root / params.eval_version] if params.eval_version else sorted(root.glob("v1.0-*"))
    if not any((folder / "sample.json").is_file() for folder in folders):
        raise DatasetError(f"{why}, and {root} holds no nuScenes tables (v1.0-*/sample.json)")


def check_output(params: PTQParams, *, client: Any = None) -> None:
    from bevfusion_ptq.errors import PublishError
    from bevfusion_ptq.s3.url import parse_url

    loc = parse_url(params.output)
    if not loc.is_s3:
        assert loc.path is not None
        existing = next(p for p in (loc.path, *loc.path.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise PublishError(f"output {loc.path} cannot be written ({existing} is not a writable directory)")
        return
    probe_s3_write(params.output, sse=params.sse, kms_key_id=params.sse_kms_key_id, client=client)


def probe_s3_write(url: str, *, sse: str | None = None, kms_key_id: str | None = None, client: Any = None) -> None:
    """Write and delete one empty object under ``url``: the bucket is reachable and writable.

    Cheaper than any list or policy query that would only suggest it, and it goes through the
    same credentials, endpoint and encryption settings as the publish will.
    """
    from bevfusion_ptq.s3 import make_client, parse_url
    from bevfusion_ptq.s3.client import translated
    from bevfusion_ptq.s3.store import sse_args

    loc = parse_url(url)
    key = loc.key(f".bevfusion-ptq-write-check-{uuid.uuid4().hex}")
    s3 = client or make_client()
    with translated(f"cannot write to {url}"):
        s3.put_object(Bucket=loc.bucket, Key=key, Body=b"", **sse_args(sse, kms_key_id))
    try:
        s3.delete_object(Bucket=loc.bucket, Key=key)
    except Exception as exc:  # noqa: BLE001 - a leftover empty probe is harmless; say so
        log.warning("could not delete the write probe s3://%s/%s (%s)", loc.bucket, key, type(exc).__name__)
