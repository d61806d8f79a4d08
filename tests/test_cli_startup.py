"""The command line before any work: help, argument errors, input checks and cached re-runs.

Each check runs the CLI as a user does (a subprocess in a fresh directory) and asserts what
the user sees: one line on stderr with the error's exit code, no traceback, no Prefect state
created, and no heavy module imported (torch, Prefect, the model zoo) where none is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from s3_server import moto_server, s3  # noqa: F401

from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.quant.defaults import DEFAULT_EXCLUDE

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "prefect", "mmdet", "mmdet3d", "spconv", "pytorch_quantization")

# Runs the CLI in-process and prints, after it, which heavy modules it imported.
_PROBE = """
import json, sys
from flows.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": sorted(m for m in %r if m in sys.modules)}), file=sys.stderr)
""" % (HEAVY,)


def _cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update(PYTHONPATH=str(REPO), BEVFUSION_PTQ_HOME=str(tmp_path / "state"), COLUMNS="250", **(env or {}))
    return subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=tmp_path, env=base,
                          capture_output=True, text=True, timeout=300)


def _outcome(proc: subprocess.CompletedProcess) -> tuple[int, list[str], list[str]]:
    """(exit code, heavy modules imported, the other stderr lines)."""
    *lines, last = proc.stderr.strip().splitlines()
    probe = json.loads(last)
    return probe["code"], probe["heavy"], lines


@pytest.mark.parametrize("command", [[], ["run"], ["plan"], ["make-dataset"], ["fetch"], ["list"], ["publish"]])
def test_help_imports_nothing_heavy_and_shows_defaults(tmp_path, command):
    proc = _cli(tmp_path, *command, "--help")
    code, heavy, _ = _outcome(proc)
    assert (code, heavy) == (0, [])
    if command == ["run"]:
        assert "(default: mse)" in proc.stdout and "Default: 300 with --data-root" in proc.stdout  # calib batches
        assert all(p in proc.stdout for p in DEFAULT_EXCLUDE)
    if command == ["make-dataset"]:
        assert "(default: 2)" in proc.stdout and "(default: 10)" in proc.stdout


def _bad_config(tmp_path: Path) -> str:
    path = tmp_path / "broken.py"
    path.write_text("model = dict(type='BEVFusion'\n")
    return str(path)


@pytest.mark.parametrize("args, code, words", [
    (["--output", "ftp://x/y"], 3, ["unsupported URL", "ftp://x/y"]),
    (["--output", "s3://Not_A_Bucket/p"], 3, ["not a bucket name"]),
    (["--sse", "AES256"], 3, ["s3:// outputs only"]),
    (["--config", "nope"], 3, ["unknown config 'nope'", "bevfusion-tiny"]),
    (["--config", "BROKEN"], 3, ["not valid Python", "line"]),
    (["--checkpoint", "/missing.pth"], 4, ["checkpoint not found: /missing.pth"]),
    (["--data-root", "/missing"], 5, ["data root not found: /missing"]),
    (["--calib-batches", "0"], 3, ["--calib-batches"]),
    (["--data-root", "NO_TABLES", "--sensitivity-metric", "nds"], 5, ["nuscenes-devkit", "no nuScenes tables"]),
])
def test_bad_input_fails_in_one_line_before_any_work(tmp_path, args, code, words):
    if "NO_TABLES" in args:  # infos for calibration and held-out batches, but no JSON tables
        root = tmp_path / "no-tables"
        root.mkdir()
        for name in ("nuscenes_infos_train.pkl", "nuscenes_infos_val.pkl"):
            (root / name).write_bytes(b"")
    args = [_bad_config(tmp_path) if a == "BROKEN" else str(tmp_path / "no-tables") if a == "NO_TABLES" else a
            for a in args]
    proc = _cli(tmp_path, "run", *args)
    got, heavy, lines = _outcome(proc)
    assert got == code, proc.stderr
    assert heavy == []  # neither Prefect nor torch was even imported
    assert len(lines) == 1 and lines[0].startswith("bevfusion-ptq: error: "), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ftp:").exists() and not (tmp_path / "state" / "prefect").exists()


def test_unwritable_bucket_fails_before_any_work(tmp_path, s3):
    proc = _cli(tmp_path, "run", "--output", f"s3://{s3.bucket}-missing/p", env=s3.env)
    code, heavy, lines = _outcome(proc)
    assert code == 8, proc.stderr  # PublishError
    assert "torch" not in heavy and "prefect" not in heavy
    assert len(lines) == 1 and "bucket does not exist" in lines[0], proc.stderr


def test_writable_bucket_passes_and_leaves_no_probe(s3):
    from bevfusion_ptq.preflight import probe_s3_write

    probe_s3_write(s3.url("models"), sse="AES256")
    assert s3.client.list_objects_v2(Bucket=s3.bucket).get("KeyCount", 0) == 0


def test_list_and_fetch_share_the_exit_code_for_a_missing_path(tmp_path):
    missing = str(tmp_path / "nothing" / "bevfusion-tiny")
    listed = _outcome(_cli(tmp_path, "list", missing))
    fetched = _outcome(_cli(tmp_path, "fetch", missing, "--to", str(tmp_path / "to")))
    assert listed[0] == fetched[0] == 13
    assert "nothing published at" in listed[2][0] and "nothing published at" in fetched[2][0]


def test_verbosity_flags_anywhere_and_version(capsys):
    from flows.cli import build_parser, main

    parser = build_parser()
    assert parser.parse_args(["-v", "list", "x"]).verbose is True
    assert parser.parse_args(["list", "x", "-v"]).verbose is True
    assert parser.parse_args(["run", "-q"]).quiet is True
    assert parser.parse_args(["-q", "run"]).quiet is True
    assert parser.parse_args(["run"]).verbose is False
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    from bevfusion_ptq import __version__

    assert capsys.readouterr().out.strip() == f"bevfusion-ptq {__version__}"


def test_exclude_adds_to_the_defaults_unless_told_otherwise():
    from flows.cli import build_parser, params_from_args

    parser = build_parser()
    assert params_from_args(parser.parse_args(["run"])).exclude == list(DEFAULT_EXCLUDE)
    assert params_from_args(parser.parse_args(["run", "--exclude", "fuser"])).exclude == [*DEFAULT_EXCLUDE, "fuser"]
    only = params_from_args(parser.parse_args(["run", "--exclude", "fuser", "--no-default-exclude"]))
    assert only.exclude == ["fuser"]
    assert params_from_args(parser.parse_args(["run", "--no-default-exclude"])).exclude == []


def test_run_form_schema_has_titles_and_no_developer_text():
    schema = PTQParams.model_json_schema()
    assert "CLI options" not in json.dumps(schema)
    titles = {name: prop["title"] for name, prop in schema["properties"].items()}
    assert titles["sse_kms_key_id"] == "SSE KMS key id" and titles["data_root"] == "nuScenes data root"
    assert len(set(titles.values())) == len(titles)
