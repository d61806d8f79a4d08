"""Write the whole deployment set of a calibrated model: five graphs per precision + deploy.md.

Layout under the output directory (a version directory, or ``--to DIR``)::

    onnx_int8/camera.backbone.onnx  camera.vtransform.onnx  fuser.onnx
              head.bbox.onnx  head.bbox.layernormplugin.onnx  lidar.backbone.xyz.onnx
    onnx_fp16/...   (on request: the same files with every quantizer off)
    deploy.md       (where each file goes in CUDA-BEVFusion, and how to build its engine)

Static shapes come from one real batch pushed through the model, so the files describe
exactly the model and image size that were calibrated.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from bevfusion_ptq.errors import ExportError
from bevfusion_ptq.export import camera, common, fuser, head, lidar
from bevfusion_ptq.export.deploy_doc import write_deploy_md

log = logging.getLogger(__name__)

BACKBONE = "camera.backbone.onnx"
VTRANSFORM = "camera.vtransform.onnx"
FUSER = "fuser.onnx"
HEAD = "head.bbox.onnx"
HEAD_PLUGIN = "head.bbox.layernormplugin.onnx"
SCN = "lidar.backbone.xyz.onnx"
FILES: tuple[str, ...] = (BACKBONE, VTRANSFORM, FUSER, HEAD, HEAD_PLUGIN, SCN)
DEPLOY_DOC = "deploy.md"


def set_dir(precision: str) -> str:
    """``onnx_int8`` / ``onnx_fp16``, the reference exporters' folder names."""
    return f"onnx_{precision}"


@dataclass(frozen=True)
class GraphInfo:
    """One written file: where, what it holds, and its Q/DQ census."""

    name: str
    precision: str
    path: str
    size: int
    nodes: int
    inputs: dict[str, list[int]]
    outputs: dict[str, list[int]]
    quantize: int
    dequantize: int
    distinct_scales: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shapes(values) -> dict[str, list[int]]:  # noqa: ANN001
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def _info(name: str, precision: str, path: Path, graph: onnx.ModelProto) -> GraphInfo:
    census = common.qdq_census(graph)
    return GraphInfo(
        name=name, precision=precision, path=str(path), size=path.stat().st_size, nodes=len(graph.graph.node),
        inputs=_shapes(graph.graph.input), outputs=_shapes(graph.graph.output),
        quantize=census.quantize, dequantize=census.dequantize, distinct_scales=len(census.scales),
    )


@dataclass(frozen=True)
class SampleInputs:
    """The graphs' example inputs, computed once from a batch by the float-quant model."""

    img: torch.Tensor
    depth: torch.Tensor
    feat_in: torch.Tensor
    camera_bev: torch.Tensor
    lidar_bev: torch.Tensor
    middle: torch.Tensor


@torch.no_grad()
def sample_inputs(model: nn.Module, batch: Mapping[str, Any]) -> SampleInputs:
    """Run the model's own parts in the runtime's order to get every graph's input."""
    if batch["img"].shape[0] != 1:
        raise ExportError(f"the runtime's graphs take batch size 1; the sample batch has {batch['img'].shape[0]}")
    img, depth = camera.camera_inputs(model, batch)
    feature, weights = camera.CameraBackboneGraph(model)(img, depth)
    feat_in = camera.pool_camera_bev(model, feature, weights, camera.camera_geometry(model, batch))
    camera_bev = camera.VTransformGraph(model)(feat_in)
    lidar_bev = model.extract_lidar_features(batch["points"]).float()
    middle = fuser.FuserGraph(model)(camera_bev, lidar_bev)
    return SampleInputs(img, depth, feat_in, camera_bev, lidar_bev, middle)


def export_set(model: nn.Module, inputs: SampleInputs, folder: Path, precision: common.Precision) -> list[GraphInfo]:
    """The five files (six with both head forms) of one precision into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[GraphInfo] = []
    jobs: list[tuple[str, nn.Module, tuple[torch.Tensor, ...], head.LayerNormForm]] = [
        (BACKBONE, camera.CameraBackboneGraph(model), (inputs.img, inputs.depth), "plain"),
        (VTRANSFORM, camera.VTransformGraph(model), (inputs.feat_in,), "plain"),
        (FUSER, fuser.FuserGraph(model), (inputs.camera_bev, inputs.lidar_bev), "plain"),
        (HEAD, head.HeadGraph(model), (inputs.middle,), "plain"),
        (HEAD_PLUGIN, head.HeadGraph(model), (inputs.middle,), "plugin"),
    ]
    with common.export_mode(model, precision):
        for name, graph_module, args, form in jobs:
            path = folder / name
            with head.layer_norm_form(form):
                graph = common.export_graph(graph_module, args, path, graph_module.input_names, graph_module.output_names)
            written.append(_info(name, precision, path, graph))
        backbone = model.encoders["lidar"]["backbone"]
        scn = lidar.write_scn(backbone, folder / SCN, int8=precision == "int8")
        written.append(_info(SCN, precision, folder / SCN, scn))
    return written


def export_deployment(
    model: nn.Module,
    batch: Mapping[str, Any],
    out_dir: str | Path,
    precisions: Sequence[str] = ("int8",),
    *,
    model_name: str = "bevfusion",
) -> list[GraphInfo]:
    """Write ``onnx_<precision>/`` for each precision and ``deploy.md`` into ``out_dir``."""
    unknown = [p for p in precisions if p not in common.PRECISIONS]
    if unknown or not precisions:
        raise ExportError(f"export precisions {list(precisions)}: choose from {list(common.PRECISIONS)}")
    out = Path(out_dir)
    model = model.eval()
    inputs = sample_inputs(model, batch)
    written: list[GraphInfo] = []
    for precision in precisions:
        log.info("exporting the %s deployment set to %s", precision, out / set_dir(precision))
        written += export_set(model, inputs, out / set_dir(precision), precision)  # type: ignore[arg-type]
    write_deploy_md(out / DEPLOY_DOC, written, model_name=model_name)
    return written
