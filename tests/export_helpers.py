"""Shared pieces of the export tests: a calibrated bevfusion-tiny, ONNX Runtime sessions, the chain.

The chain is the runtime's order of work with consumers we can run: ONNX Runtime for the four
TensorRT graphs, :class:`tests.scn_interpreter.ScnInterpreter` for the lidar graph, and our
PyTorch BEV pooling between the two camera graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from bevfusion_ptq.data.batch import random_batch
from bevfusion_ptq.export import camera
from bevfusion_ptq.export.deployment import BACKBONE, FUSER, HEAD, SCN, VTRANSFORM
from bevfusion_ptq.export.head import OUTPUTS, decode_outputs
from bevfusion_ptq.model.builder import build_model
from bevfusion_ptq.model.config import load_config
from bevfusion_ptq.quant.calibrate import calibrate
from bevfusion_ptq.quant.fold_relu import fold_relu
from bevfusion_ptq.quant.fuse import fuse_bn
from bevfusion_ptq.quant.insert import apply_exclusions, insert_quantizers
from bevfusion_ptq.quant.rules import DEFAULT_EXCLUDE, bevfusion_rules
from tests.scn_interpreter import ScnInterpreter
from tests.test_quant_placement import _random_bn


def calibrated_tiny(num_batches: int = 2, method: str = "max") -> tuple[Any, nn.Module, list[dict]]:
    """bevfusion-tiny with random weights and BN statistics, calibrated on synthetic batches (amax by
    max: quick, and the export does not care how amax was chosen),
    the two reference exclusions applied and the ReLUs recorded, as the pipeline leaves it."""
    cfg = load_config("bevfusion-tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    _random_bn(model)
    insert_quantizers(model, bevfusion_rules())
    fuse_bn(model)
    batches = [random_batch(cfg, num_points=4000, seed=i) for i in range(num_batches)]
    calibrate(model, batches, method=method, num_batches=num_batches)
    apply_exclusions(model, DEFAULT_EXCLUDE)
    fold_relu(model)
    return cfg, model, batches


def session(path: Path, *, float_qdq: bool = False, **options: Any) -> ort.InferenceSession:
    """A CPU session, one thread (the machine is shared), full graph optimization.

    ``float_qdq`` keeps every QuantizeLinear/DequantizeLinear pair as its own float op
    instead of fusing it into ONNX Runtime's INT8 kernels. Those kernels multiply uint8 by
    int8 with a 16-bit intermediate on x86 CPUs without VNNI, which saturates (ONNX Runtime's
    quantization guide warns of it); on such a CPU they move a convolution's output by tens
    of quantization steps, a fault of that kernel that TensorRT does not share.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    if float_qdq:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    for key, value in options.items():
        setattr(so, key, value)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    feeds = {k: v.detach().float().contiguous().numpy() for k, v in inputs.items()}
    names = [o.name for o in sess.get_outputs()]
    return {n: torch.from_numpy(np.asarray(v)) for n, v in zip(names, sess.run(names, feeds))}


def lidar_voxels(model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The voxel features and (b, x, y, z) indices the runtime's voxelization hands libspconv."""
    with torch.no_grad():
        return model.encoders["lidar"]["voxelize"](batch["points"])


def run_chain(folder: Path, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Boxes (and every intermediate) from the deployment files alone, in the runtime's order."""
    img, depth = camera.camera_inputs(model, batch)
    cam = run(session(folder / BACKBONE), img=img, depth=depth)
    with torch.no_grad():
        feat_in = camera.pool_camera_bev(
            model, cam["camera_feature"], cam["camera_depth_weights"], camera.camera_geometry(model, batch)
        )
    camera_bev = run(session(folder / VTRANSFORM), feat_in=feat_in)["feat_out"]
    feats, coords, batch_size = lidar_voxels(model, batch)
    with torch.no_grad():
        lidar_bev = ScnInterpreter(folder / SCN)(feats, coords, batch_size)
    middle = run(session(folder / FUSER), camera=camera_bev, lidar=lidar_bev)["middle"]
    outputs = run(session(folder / HEAD), middle=middle)
    boxes = decode_outputs(model.heads["object"], {k: outputs[k] for k in OUTPUTS})
    return {"camera_bev": camera_bev, "lidar_bev": lidar_bev, "middle": middle, "outputs": outputs, "boxes": boxes}
