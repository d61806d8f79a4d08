"""The CLI commands as a user runs them: real files, real processes, exit codes and messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.quant.defaults import DEFAULT_EXCLUDE


def _cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def test_make_then_inspect_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpts" / "tiny.pth"
    made = _cli("make-checkpoint", str(ckpt), "--config", "bevfusion-tiny", "--seed", "3", cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    raw = torch.load(ckpt, weights_only=True)
    assert set(raw) >= {"state_dict", "meta"}

    inspected = _cli("inspect-checkpoint", str(ckpt), "--config", "bevfusion-tiny", cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr[-3000:]
    assert f"num_keys: {len(raw['state_dict'])}" in inspected.stdout
    assert "sparse_layout: spconv1" in inspected.stdout


def test_inspect_checkpoint_mismatch_exits_nonzero_with_the_key_error(tmp_path):
    ckpt = tmp_path / "tiny.pth"
    assert _cli("make-checkpoint", str(ckpt), "--config", "bevfusion-tiny", cwd=tmp_path).returncode == 0
    raw = torch.load(ckpt, weights_only=True)
    del raw["state_dict"]["fuser.0.weight"]
    raw["state_dict"]["bogus.weight"] = torch.zeros(1)
    torch.save(raw, ckpt)
    proc = _cli("inspect-checkpoint", str(ckpt), "--config", "bevfusion-tiny", cwd=tmp_path)
    assert proc.returncode == 4  # CheckpointError
    assert "fuser.0.weight" in proc.stderr and "bogus.weight" in proc.stderr


def test_inspect_checkpoint_unknown_config_lists_valid_names(tmp_path):
    proc = _cli("inspect-checkpoint", str(tmp_path / "x.pth"), "--config", "bevfusion-swin", cwd=tmp_path)
    assert proc.returncode == 3  # ConfigError
    assert "bevfusion-r50" in proc.stderr and "bevfusion-tiny" in proc.stderr


def test_make_dataset_writes_a_tree_the_flow_can_use(tmp_path):
    root = tmp_path / "nuscenes"
    proc = _cli("make-dataset", str(root), "--scenes", "2", "--frames", "3", "--seed", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "nuscenes_infos_train.pkl").is_file()
    assert len(list((root / "samples" / "CAM_FRONT").glob("*.jpg"))) == 6
    assert list((root / "sweeps" / "LIDAR_TOP").glob("*.pcd.bin"))

    # --data-root with fewer keyframes than batches fails before any model work.
    proc = _cli("run", "--data-root", str(root), "--calib-batches", "5", "--output", str(tmp_path / "out"),
                cwd=tmp_path)
    assert proc.returncode == 5, proc.stderr[-3000:]  # DatasetError
    assert "only 3 samples" in proc.stderr


def test_run_options_are_the_parameter_model():
    from flows.cli import build_parser, params_from_args

    ns = build_parser().parse_args(
        ["run", "--calib-batches", "3", "--calib-method", "percentile", "--percentile", "99.9",
         "--exclude", "a.b", "--exclude", "c.*", "--device", "cpu", "--calib-sampling", "shuffle"]
    )
    params = params_from_args(ns)
    assert params == PTQParams(
        calib_batches=3, calib_method="percentile", percentile=99.9, exclude=[*DEFAULT_EXCLUDE, "a.b", "c.*"],
        device="cpu", calib_sampling="shuffle",
    )
    assert set(PTQParams.model_fields) <= set(vars(ns))


def test_plan_json_lists_every_quantizer_with_all_its_names(capsys):
    import json

    from flows.cli import main

    assert main(["plan", "--config", "bevfusion-tiny", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 120  # distinct quantizer objects of bevfusion-tiny
    for row in rows:
        assert {"names", "enabled", "num_bits", "axis", "calibrator", "share_group"} <= row.keys()
    disabled = sorted(n for r in rows if not r["enabled"] for n in r["names"])
    assert disabled == [
        "decoder.neck.deblocks.0.0._input_quantizer", "decoder.neck.deblocks.0.0._weight_quantizer",
        "encoders.lidar.backbone.conv_input.0._input_quantizer",
        "encoders.lidar.backbone.conv_input.0._weight_quantizer",
    ]
    groups = {r["share_group"]: set(r["names"]) for r in rows if r["share_group"]}
    residual = {g for g in groups if g.startswith("residual:")}
    assert set(groups) - residual == {"layer3-lateral0", "layer4-lateral1"}
    # Bottleneck blocks share inside the block: conv1 with the downsample or the identity.
    assert "residual:encoders.camera.backbone.layer1.0" in residual
    assert {
        "encoders.camera.backbone.layer1.0.conv1._input_quantizer",
        "encoders.camera.backbone.layer1.0.downsample.0._input_quantizer",
    } <= groups["residual:encoders.camera.backbone.layer1.0"]
    assert {
        "encoders.camera.backbone.layer3.0.conv1._input_quantizer",
        "encoders.camera.backbone.layer3.0.downsample.0._input_quantizer",
        "encoders.camera.neck.lateral_convs.0.conv._input_quantizer",
    } <= groups["layer3-lateral0"]
    assert not any(n.startswith(("heads.", "encoders.camera.vtransform.downsample")) for r in rows for n in r["names"])


def test_plan_table_and_custom_exclusions(capsys):
    from flows.cli import main

    assert main(["plan", "--config", "bevfusion-tiny", "--exclude", "fuser", "--no-default-exclude"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "120 quantizers, 118 enabled, 2 disabled by exclusions"
    assert "OFF 8b tensor     histogram fuser.0._input_quantizer" in out


def test_plan_adds_exclusions_and_names_the_closest_modules_for_a_typo(capsys, caplog):
    from flows.cli import main

    assert main(["plan", "--config", "bevfusion-tiny", "--exclude", "fuser.O"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "120 quantizers, 116 enabled, 4 disabled by exclusions"
    [warning] = [r.getMessage() for r in caplog.records if "matches no quantized module" in r.getMessage()]
    assert "'fuser.O'" in warning and "closest quantized modules: fuser.0" in warning
