"""What every dense deployment graph shares: export mode, precision, the export call, Q/DQ census.

The four TensorRT graphs are traced in float32 by the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``): pytorch-quantization's export mode
(``TensorQuantizer.use_fb_fake_quant``) turns each enabled quantizer into
``torch.fake_quantize_per_{tensor,channel}_affine``, which that exporter lowers to a
QuantizeLinear/DequantizeLinear pair (scale = amax/127, int8 zero point 0, weights per output
channel). Those ops reject float16 inputs, hence float32 tracing; TensorRT
builds the engines in FP16/INT8 from the precision flags (see ``deploy.md``).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx
import torch
from onnx import numpy_helper
from pytorch_quantization.nn import TensorQuantizer
from torch import nn

from bevfusion_ptq.errors import ExportError

log = logging.getLogger(__name__)

#: ONNX opset of the four TensorRT graphs (the reference's; QuantizeLinear per axis needs >= 13)
OPSET = 13
Precision = Literal["int8", "fp16"]
PRECISIONS: tuple[str, ...] = ("int8", "fp16")


@contextlib.contextmanager
def export_mode(model: nn.Module, precision: Precision) -> Iterator[None]:
    """Quantizers in ONNX export mode; for ``fp16`` every quantizer off (an A/B set).

    Everything is put back on exit, so exporting never changes the calibrated model.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"unknown export precision {precision!r}; use one of {PRECISIONS}")
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    disabled = [q._disabled for q in quantizers]
    previous = TensorQuantizer.use_fb_fake_quant
    TensorQuantizer.use_fb_fake_quant = True
    try:
        if precision == "fp16":
            for q in quantizers:
                q.disable()
        yield
    finally:
        TensorQuantizer.use_fb_fake_quant = previous
        for q, was in zip(quantizers, disabled):
            q._disabled = was


def export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> onnx.ModelProto:
    """One static-shape, opset-13 TorchScript export, checked by ``onnx.checker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # MultiheadAttention's inference fast path is one fused op without an ONNX symbolic.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _export(module, args, path, input_names, output_names)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    graph = onnx.load(str(path))
    try:
        onnx.checker.check_model(graph, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name}: onnx.checker rejects the exported graph: {exc}") from None
    log.info("wrote %s (%d nodes)", path, len(graph.graph.node))
    return graph


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: Sequence[str],
            output_names: Sequence[str]) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # dynamo=False: torch 2.13 defaults to the dynamo exporter, which needs onnxscript
        # (not a dependency here) and has no opset-13 path; the TorchScript exporter lowers
        # fake_quantize_per_{tensor,channel}_affine to QuantizeLinear/DequantizeLinear at
        # opset 13 (tests/test_export.py checks every scale). Its deprecation and tracer
        # warnings about Python values in a static-shape graph are expected.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


@dataclass(frozen=True)
class QDQCensus:
    """The Q/DQ content of one graph: pair count and the distinct scales (one per quantizer)."""

    quantize: int
    dequantize: int
    scales: tuple[tuple[float, ...], ...]  # distinct scale tensors, flattened

    @property
    def pairs(self) -> int:
        return min(self.quantize, self.dequantize)


def qdq_census(graph: onnx.ModelProto) -> QDQCensus:
    """Count QuantizeLinear/DequantizeLinear nodes and collect their distinct scales."""
    constants = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attr.t)
    quantize = dequantize = 0
    scales: dict[tuple[float, ...], None] = {}
    for node in graph.graph.node:
        if node.op_type == "QuantizeLinear":
            quantize += 1
            scale = constants.get(node.input[1])
            if scale is None:
                raise ExportError(f"QuantizeLinear {node.name} has a computed scale; expected a constant")
            scales[tuple(float(v) for v in scale.reshape(-1))] = None
        elif node.op_type == "DequantizeLinear":
            dequantize += 1
    return QDQCensus(quantize, dequantize, tuple(scales))
