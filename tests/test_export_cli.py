"""``bevfusion-ptq export``: the deployment set again from a saved version's portable files."""

from __future__ import annotations

import onnx
import pytest
import torch

from bevfusion_ptq.artifacts import save_artifacts
from bevfusion_ptq.export import FILES, export_deployment
from bevfusion_ptq.export.common import qdq_census
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.quant.report import quantizer_status
from bevfusion_ptq.quant.rules import BEVFUSION_SHARE
from flows.cli import main
from tests.export_helpers import calibrated_tiny
from tests.model_helpers import torch_threads


@pytest.fixture(scope="module")
def saved_version(tmp_path_factory):
    """A saved version (without export) and the INT8 set exported from the live model."""
    with torch_threads(1):
        cfg, model, batches = calibrated_tiny()
        status = [r.as_dict() for r in quantizer_status(model, "max", BEVFUSION_SHARE)]
        root = tmp_path_factory.mktemp("versions")
        saved = save_artifacts(model, status, root, model_name="bevfusion-tiny", version="v1", inputs={},
                               extra_files={"config.json": cfg.to_dict()})
        live = tmp_path_factory.mktemp("live")
        export_deployment(model, batches[0], live, ["int8"])
        yield saved.path, live


def test_cli_reexports_int8_and_fp16_from_state_dict_and_quantizers(saved_version, tmp_path, capsys):
    version, live = saved_version
    (version / "model.pth").unlink()  # the pickle is not needed
    out = tmp_path / "deploy"
    with torch_threads(1):
        assert main(["export", str(version), "--to", str(out), "--export", "int8,fp16"]) == 0
    assert "wrote 12 files" in capsys.readouterr().out
    for precision in ("int8", "fp16"):
        assert sorted(p.name for p in (out / f"onnx_{precision}").iterdir()) == sorted(FILES)
    assert "onnx_fp16/" in (out / "deploy.md").read_text()
    for name in FILES:
        again, original = onnx.load(str(out / "onnx_int8" / name)), onnx.load(str(live / "onnx_int8" / name))
        # Same calibrated model: the same Q/DQ with the same scales, the same weights.
        assert qdq_census(again) == qdq_census(original), name
        # (auto-generated initializer names depend on the tracer's numbering: compare contents)
        weights = sorted((tuple(t.dims), t.raw_data) for t in original.graph.initializer)
        assert sorted((tuple(t.dims), t.raw_data) for t in again.graph.initializer) == weights, name
        fp16 = onnx.load(str(out / "onnx_fp16" / name))
        assert qdq_census(fp16).quantize == 0, name
    scn = onnx.load(str(out / "onnx_fp16" / "lidar.backbone.xyz.onnx"))
    precisions = {a.s for n in scn.graph.node for a in n.attribute if a.name in ("precision", "output_precision")}
    assert precisions == {b"fp16"}


def test_cli_export_refuses_a_directory_that_is_not_a_version(tmp_path, capsys):
    (tmp_path / "state_dict.pth").write_bytes(b"")
    assert main(["export", str(tmp_path), "--to", str(tmp_path / "out")]) == 15
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lacks quantizers.json, config.json" in err
    assert main(["export", str(tmp_path), "--export", "int4"]) == 3


def test_export_option_parses_comma_lists_and_none():
    assert PTQParams().export == ["int8"]
    assert PTQParams(export=["int8,fp16"]).export == ["int8", "fp16"]
    assert PTQParams(export=["fp16", "int8", "fp16"]).export == ["fp16", "int8"]
    assert PTQParams(export=["none"]).export == []
    with pytest.raises(ValueError):
        PTQParams(export=["int4"])
