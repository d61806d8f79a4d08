"""An interpreter of the lidar "scn" graph (lidar.backbone.xyz.onnx), for tests and tools.

It stands in for libspconv, which cannot be installed here: the sparse network is rebuilt from
the ONNX file alone (node attributes, float16 initializers, rulebook keys) and run with spconv.
Semantics follow ``reference/export.md`` section 5, including the parser's defaults for a
missing attribute (0, 0.0, ""), so a file that would silently break the runtime gives a wrong
answer here too:

- ``SparseConvolution``: ``subm`` picks SubMConv3d (1) or SparseConv3d (0); ``rulebook`` is the
  indice key, so convs sharing it share their indices; weights are read as
  ``[Cout, k0, k1, k2, Cin]``; with ``precision == "int8"`` the input features are fake-quantized
  with ``input_dynamic_range`` and the weights per output channel with ``weight_dynamic_ranges``
  (scale = amax / 127); then the bias, then ``activation`` ("ReLU" or "None"/"").
- ``Add``: with ``precision == "int8"`` both inputs fake-quantized with their ranges; ``Relu``.
- ``ScatterDense`` (``format`` "xyz") -> dense ``[B, C, X, Y, Z]``; ``Transpose`` / ``Reshape`` by
  their ``dims`` attribute.
- An int8 output (``output_precision``) into ScatterDense, which has no range, is refused.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import spconv.pytorch as spconv
import torch
from onnx import helper, numpy_helper
from pytorch_quantization.tensor_quant import fake_tensor_quant

from bevfusion_ptq.sparse_cpu import serial_on_cpu

_DEFAULTS = {"int": 0, "float": 0.0, "str": ""}


class ScnInterpreter:
    """Callable ``(features [N, C], coords [N, 4] (b, x, y, z), batch_size) -> output tensor``."""

    def __init__(self, model: onnx.ModelProto | str | Path) -> None:
        self.model = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        graph = self.model.graph
        self.weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).astype("float32")) for t in graph.initializer}
        self.nodes = list(graph.node)
        self.input = graph.input[0].name
        self.output = graph.output[0].name
        first = next(n for n in self.nodes if n.op_type == "SparseConvolution")
        self.grid = [int(v) for v in self.attr(first, "input_spatial_shape", [])]

    @staticmethod
    def attr(node: onnx.NodeProto, name: str, default=None):  # noqa: ANN001, ANN205
        for a in node.attribute:
            if a.name == name:
                value = helper.get_attribute_value(a)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def _conv(self, node: onnx.NodeProto, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        a = lambda name, kind: self.attr(node, name, _DEFAULTS[kind])  # noqa: E731
        cin, cout = int(a("in_channels", "int")), int(a("out_channels", "int"))
        ksize = [int(v) for v in self.attr(node, "kernel_size", [])]
        weight, bias = self.weights[node.input[1]], self.weights[node.input[2]]
        if tuple(weight.shape) != (cout, *ksize, cin):
            raise ValueError(f"{node.name}: weight {tuple(weight.shape)} is not [Cout, k0, k1, k2, Cin]")
        common = dict(
            kernel_size=ksize, stride=list(self.attr(node, "stride", [1, 1, 1])),
            padding=list(self.attr(node, "padding", [0, 0, 0])), dilation=list(self.attr(node, "dilation", [1, 1, 1])),
            bias=False, indice_key=a("rulebook", "str") or None,
        )
        conv = (spconv.SubMConv3d if a("subm", "int") else spconv.SparseConv3d)(cin, cout, **common).eval()
        features = x.features
        if a("precision", "str") == "int8":
            features = fake_tensor_quant(features, torch.tensor(float(a("input_dynamic_range", "float"))))
            ranges = torch.tensor(list(self.attr(node, "weight_dynamic_ranges", [])), dtype=torch.float32)
            weight = fake_tensor_quant(weight, ranges.view(-1, 1, 1, 1, 1))
        with torch.no_grad():
            conv.weight.copy_(weight)
        with serial_on_cpu(features.device), torch.no_grad():
            out = conv(x.replace_feature(features))
        feats = out.features + bias
        activation = a("activation", "str")
        if activation == "ReLU":
            feats = torch.relu(feats)
        elif activation not in ("None", ""):
            raise ValueError(f"{node.name}: unknown activation {activation!r}")
        return out.replace_feature(feats)

    def _add(self, node: onnx.NodeProto, a: spconv.SparseConvTensor, b: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        fa, fb = a.features, b.features
        if self.attr(node, "precision", "") == "int8":
            fa = fake_tensor_quant(fa, torch.tensor(float(self.attr(node, "input0_dynamic_range", 0.0))))
            fb = fake_tensor_quant(fb, torch.tensor(float(self.attr(node, "input1_dynamic_range", 0.0))))
        return a.replace_feature(fa + fb)

    def __call__(self, features: torch.Tensor, coords: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
        values: dict[str, object] = {
            self.input: spconv.SparseConvTensor(features.float(), coords.int(), self.grid, batch_size)
        }
        producer: dict[str, onnx.NodeProto] = {}
        for node in self.nodes:
            ins = [values[n] for n in node.input[:1]]
            if node.op_type == "SparseConvolution":
                out = self._conv(node, ins[0])
            elif node.op_type == "Add":
                out = self._add(node, values[node.input[0]], values[node.input[1]])
            elif node.op_type == "Relu":
                out = ins[0].replace_feature(torch.relu(ins[0].features))
            elif node.op_type == "ScatterDense":
                if self.attr(node, "format", "") != "xyz":
                    raise ValueError(f"{node.name}: only the xyz format is interpreted")
                source = producer.get(node.input[0])
                if source is not None and self.attr(source, "output_precision", "") == "int8":
                    raise ValueError(f"{source.name} outputs int8 into ScatterDense, which has no dynamic range")
                out = ins[0].dense()
                expected = list(self.attr(node, "output_shape", []))
                if list(out.shape) != [expected[0] * batch_size, *expected[1:]] and expected:
                    raise ValueError(f"{node.name}: dense shape {list(out.shape)} != output_shape {expected}")
            elif node.op_type == "Transpose":
                out = ins[0].permute(*self.attr(node, "dims", []))
            elif node.op_type == "Reshape":
                dims = list(self.attr(node, "dims", []))
                out = ins[0].reshape(batch_size, *dims[1:])
            else:
                raise ValueError(f"{node.name}: op {node.op_type} is not in the scn format")
            for name in node.output:
                values[name] = out
                producer[name] = node
        return values[self.output]
