"""Checkpoint files through the real loading path: round trip, layouts, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import UntrustedMeta

from bevfusion_ptq.errors import CheckpointError, ConfigError
from bevfusion_ptq.model import (
    build_model,
    inspect_checkpoint,
    load_checkpoint,
    load_config,
    load_model,
    make_checkpoint,
)
from bevfusion_ptq.model.checkpoint import convert_sparse_weights

SPARSE_KEY = "encoders.lidar.backbone.conv_input.0.weight"


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config("bevfusion-tiny")


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_cfg, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    make_checkpoint(path, tiny_cfg, seed=3)
    return path


def _raw_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_make_checkpoint_writes_reference_layout(tiny_ckpt: Path) -> None:
    raw = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    assert set(raw) == {"state_dict", "meta"}
    assert raw["meta"]["sparse_layout"] == "spconv1"
    # conv_input: SubM 5 -> 8, spconv 1.x layout [k0, k1, k2, Cin, Cout]
    assert tuple(raw["state_dict"][SPARSE_KEY].shape) == (3, 3, 3, 5, 8)
    var = raw["state_dict"]["encoders.camera.backbone.bn1.running_var"]
    assert 0.5 <= float(var.min()) and float(var.max()) <= 2.0
    mean = raw["state_dict"]["fuser.1.running_mean"]
    assert float(mean.abs().max()) < 1.0 and float(mean.abs().max()) > 0.0


def test_make_checkpoint_is_deterministic(tiny_cfg, tiny_ckpt: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.pth"
    make_checkpoint(again, tiny_cfg, seed=3)
    a, b = _raw_state(tiny_ckpt), _raw_state(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = tmp_path / "other.pth"
    make_checkpoint(other, tiny_cfg, seed=4)
    assert not torch.equal(a[SPARSE_KEY], _raw_state(other)[SPARSE_KEY])


def test_round_trip_identical_tensors(tiny_cfg, tiny_ckpt: Path) -> None:
    raw = _raw_state(tiny_ckpt)
    model = load_model(tiny_cfg, tiny_ckpt)
    assert not model.training
    state = model.state_dict()
    assert list(state) == list(raw)
    for key, value in raw.items():
        expected = value.permute(4, 0, 1, 2, 3) if value.dim() == 5 else value
        assert torch.equal(state[key], expected), key
    assert tuple(state[SPARSE_KEY].shape) == (8, 3, 3, 3, 5)
    # the asymmetric output conv (kernel 1x1x3) is where a wrong permute shows
    conv_out = "encoders.lidar.backbone.conv_out.0.weight"
    assert tuple(raw[conv_out].shape) == (1, 1, 3, 64, 64)
    assert tuple(state[conv_out].shape) == (64, 1, 1, 3, 64)


def test_loading_twice_never_permutes_twice(tiny_cfg, tiny_ckpt: Path) -> None:
    model = build_model(tiny_cfg)
    first = load_checkpoint(model, tiny_ckpt)
    once = {k: v.clone() for k, v in model.state_dict().items()}
    second = load_checkpoint(model, tiny_ckpt)
    assert first["sparse_converted"] == second["sparse_converted"] > 0
    assert all(torch.equal(once[k], v) for k, v in model.state_dict().items())


def test_bare_state_dict_spconv2_with_module_prefix(tiny_cfg, tiny_ckpt: Path, tmp_path: Path) -> None:
    reference = load_model(tiny_cfg, tiny_ckpt).state_dict()
    path = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v.clone() for k, v in reference.items()}, path)
    model = build_model(tiny_cfg)
    summary = load_checkpoint(model, path)
    assert summary["format"] == "state_dict"
    assert summary["module_prefix"] is True
    assert summary["sparse_layout"] == "spconv2"
    assert summary["sparse_converted"] == 0
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())


def test_summary_and_inspect(tiny_cfg, tiny_ckpt: Path) -> None:
    summary = inspect_checkpoint(tiny_ckpt, "bevfusion-tiny")
    model = build_model(tiny_cfg)
    assert summary["config"] == "bevfusion_tiny"
    assert summary["format"] == "mmcv"
    assert summary["num_keys"] == len(model.state_dict())
    assert summary["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert summary["sparse_layout"] == "spconv1"
    assert summary["sparse_tensors"] == summary["sparse_converted"] > 0
    assert summary["meta"]["seed"] == 3


def _save_modified(tiny_ckpt: Path, path: Path, edit) -> Path:
    raw = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    edit(raw["state_dict"])
    torch.save(raw, path)
    return path


def test_missing_key_error(tiny_cfg, tiny_ckpt: Path, tmp_path: Path) -> None:
    path = _save_modified(tiny_ckpt, tmp_path / "missing.pth", lambda sd: sd.pop("fuser.0.weight"))
    with pytest.raises(CheckpointError) as info:
        load_model(tiny_cfg, path)
    message = str(info.value)
    assert "1 missing, 0 unexpected, 0 wrong-shape" in message
    assert "fuser.0.weight" in message and str(path) in message


def test_unexpected_key_error(tiny_cfg, tiny_ckpt: Path, tmp_path: Path) -> None:
    def add(sd):
        sd["heads.object.extra.weight"] = torch.zeros(3)

    path = _save_modified(tiny_ckpt, tmp_path / "extra.pth", add)
    expected = r"0 missing, 1 unexpected, 0 wrong-shape(.|\n)*heads\.object\.extra\.weight"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(build_model(tiny_cfg), path)


def test_wrong_shape_error(tiny_cfg, tiny_ckpt: Path, tmp_path: Path) -> None:
    def shrink(sd):
        sd["fuser.0.weight"] = sd["fuser.0.weight"][:, :-1]
        sd["encoders.lidar.backbone.conv_out.0.weight"] = torch.zeros(1, 1, 3, 64, 32)

    path = _save_modified(tiny_ckpt, tmp_path / "shape.pth", shrink)
    with pytest.raises(CheckpointError) as info:
        load_model(tiny_cfg, path)
    message = str(info.value)
    assert "0 missing, 0 unexpected, 2 wrong-shape" in message
    assert "fuser.0.weight: checkpoint [64, 95, 3, 3] vs model [64, 96, 3, 3]" in message
    assert "conv_out.0.weight" in message


def test_listing_is_capped_at_20(tiny_cfg, tiny_ckpt: Path, tmp_path: Path) -> None:
    def drop_many(sd):
        for key in [k for k in sd if k.startswith("encoders.camera.backbone.")][:25]:
            sd.pop(key)

    path = _save_modified(tiny_ckpt, tmp_path / "many.pth", drop_many)
    with pytest.raises(CheckpointError, match=r"25 missing(.|\n)*\.\.\. and 5 more"):
        load_model(tiny_cfg, path)


def test_missing_file(tiny_cfg, tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_model(tiny_cfg, path)


def test_pickled_objects_need_trust(tiny_cfg, tiny_ckpt: Path, tmp_path: Path) -> None:
    raw = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    raw["meta"]["object"] = UntrustedMeta()
    path = tmp_path / "pickled.pth"
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="trust_pickle"):
        load_model(tiny_cfg, path)
    model = load_model(tiny_cfg, path, trust_pickle=True)
    assert torch.equal(model.state_dict()["fuser.0.weight"], raw["state_dict"]["fuser.0.weight"])


def test_sparse_layout_decision() -> None:
    expected = {"cube": (3, 3, 3, 3, 3), "conv": (8, 3, 3, 3, 5), "bn": (8,)}
    cube = torch.randn(3, 3, 3, 3, 3)
    v2 = torch.randn(8, 3, 3, 3, 5)
    v1 = v2.permute(1, 2, 3, 4, 0).contiguous()

    out, report = convert_sparse_weights({"cube": cube, "conv": v1, "bn": torch.ones(8)}, expected)
    assert report == {"layout": "spconv1", "sparse_tensors": 2, "converted": 2}
    assert torch.equal(out["conv"], v2) and torch.equal(out["cube"], cube.permute(4, 0, 1, 2, 3))
    again, report2 = convert_sparse_weights(out, expected)  # idempotent on its output
    assert report2["converted"] == 0 and torch.equal(again["conv"], v2)

    out, report = convert_sparse_weights({"cube": cube, "conv": v2}, expected)
    assert report["layout"] == "spconv2" and report["converted"] == 0
    assert out["cube"] is cube  # ambiguous tensors follow the checkpoint's layout

    _, report = convert_sparse_weights({"cube": cube}, {"cube": (3, 3, 3, 3, 3)})
    assert report["layout"] == "spconv1"  # nothing decides: the reference layout

    expected_two = {**expected, "other": (4, 1, 1, 3, 2)}
    mixed = {"conv": v1, "other": torch.zeros(4, 1, 1, 3, 2)}
    with pytest.raises(CheckpointError, match="mix"):
        convert_sparse_weights(mixed, expected_two)


def test_config_names(tmp_path: Path) -> None:
    for name in ("bevfusion-r50", "bevfusion_r50", "bevfusion-tiny", "bevfusion_tiny"):
        cfg = load_config(name)
        assert cfg.model.type == "BEVFusion" and "data" in cfg
    with pytest.raises(ConfigError, match="bevfusion-r50, bevfusion-tiny"):
        load_config("bevfusion-r101")
    user = tmp_path / "mine.py"
    user.write_text("model = dict(type='BEVFusion')\ndata = dict(image_size=[1, 1])\n")
    assert load_config(str(user)).data.image_size == [1, 1]
    (tmp_path / "bad.py").write_text("model = dict(type='BEVFusion')\n")
    with pytest.raises(ConfigError, match="data"):
        load_config(str(tmp_path / "bad.py"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "absent.py"))
