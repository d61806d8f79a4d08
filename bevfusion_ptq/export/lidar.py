"""lidar.backbone.xyz.onnx: the sparse lidar encoder as the "scn" graph libspconv parses.

Not a traced graph: libspconv reads a hand-written description of the network, so this module
walks our calibrated spconv 2 encoder in execution order and emits one node per layer with
``onnx.helper`` (the format is in ``reference/export.md`` section 5):

- ``SparseConvolution`` inputs [x, W, b]: W float16 ``[Cout, k0, k1, k2, Cin]`` (spconv 2's own
  layout, BN already folded in, so no permutation), b float16 (required, even if zero);
  attributes for geometry, ``rulebook`` (the conv's ``indice_key``: subm convs at one
  resolution share it, so the runtime reuses their indices), ``activation``, dynamic ranges as
  amax (``input_dynamic_range`` and ``weight_dynamic_ranges`` per output channel) and
  ``precision``/``output_precision``.
- The export-only ReLU fold: a conv followed by a ReLU (inside a SparseSequential, or a
  SparseBasicBlock's conv1) carries ``activation="ReLU"`` and the ReLU module emits nothing;
  the PyTorch model keeps its ReLU modules (:mod:`bevfusion_ptq.quant.fold_relu`).
- A residual block: conv1 (ReLU), conv2, ``Add`` [conv2 out, identity] with the block's
  QuantAdd amax on both inputs, then ``Relu``.
- The tail ``ScatterDense`` (xyz) -> ``Transpose`` [0,1,4,2,3] -> ``Reshape`` [1, C*Z, X, Y]:
  the dense ``[1, C, X, Y, Z]`` grid with height folded into channels, channel = c*Z + z,
  exactly as :meth:`BEVSparseEncoder.forward` does.

Precision is derived from the calibrated model, not from layer names: a conv whose input
quantizer is enabled runs int8, otherwise fp16 (``conv_input``, whose quantizer is excluded);
every conv outputs int8 in an int8 graph except the last one, whose output goes to
ScatterDense without a range (fp16). Every shape comes from the model (sparse shape, kernel,
stride, padding), so bevfusion-tiny and bevfusion-r50 go through the same code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import spconv.pytorch as spconv
from cumm.tensorview.gemm import Activation
from mmdet3d.models.layers.sparse_block import SparseBasicBlock
from onnx import TensorProto, helper, numpy_helper
from pytorch_quantization.nn import TensorQuantizer
from spconv.pytorch.conv import SparseConvolution
from spconv.pytorch.ops import get_conv_output_size
from torch import nn

from bevfusion_ptq.errors import ExportError

log = logging.getLogger(__name__)

#: what the runtime's parser expects in the file header (reference exporter's values)
SCN_OPSET = 11
PRODUCER = ("pytorch", "1.9")
#: libspconv's per-conv output budget (voxels); the parser's own default is 150000
OUTPUT_BOUND = 200000
_PASS_THROUGH = (nn.Identity,)


def _amax(quantizer: TensorQuantizer | None) -> list[float] | None:
    if quantizer is None or getattr(quantizer, "_amax", None) is None:
        return None
    return [float(v) for v in quantizer._amax.detach().float().cpu().reshape(-1)]


def _enabled(quantizer: TensorQuantizer | None) -> bool:
    return quantizer is not None and not quantizer._disabled


@dataclass
class _Writer:
    """Accumulates nodes and initializers; tensor names are decimal counters as in the reference."""

    int8: bool
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    counter: int = 0
    convs: int = 0
    subm_keys: dict = field(default_factory=dict)  # (spatial shape, kernel) -> rulebook
    channels: int = 0  # of the last tensor written

    def tensor(self) -> str:
        self.counter += 1
        return str(self.counter)

    def conv(self, conv: SparseConvolution, x: str, shape: list[int], activation: str, last: bool) -> tuple[str, list[int]]:
        if conv.transposed or conv.inverse or conv.groups != 1:
            raise ExportError(f"sparse conv {conv.indice_key!r}: transposed/inverse/grouped convs are not in the scn format")
        if conv.bias is None:
            raise ExportError(f"sparse conv {conv.indice_key!r} has no bias: fold BN (fuse_bn) before exporting")
        ksize, stride, padding, dilation = (list(map(int, v)) for v in (conv.kernel_size, conv.stride, conv.padding, conv.dilation))
        out_shape = list(shape) if conv.subm else [int(v) for v in get_conv_output_size(shape, ksize, stride, padding, dilation)]
        weight = conv.weight.detach().float().cpu()
        expected = (conv.out_channels, *ksize, conv.in_channels)
        if tuple(weight.shape) != expected:
            raise ExportError(f"sparse conv {conv.indice_key!r}: weight {tuple(weight.shape)} is not [Cout, k0, k1, k2, Cin] {expected}")
        name = f"spconv{self.convs}"
        self.convs += 1
        w = numpy_helper.from_array(weight.numpy().astype(np.float16), f"{name}.weight")
        b = numpy_helper.from_array(conv.bias.detach().float().cpu().numpy().astype(np.float16), f"{name}.bias")
        self.initializers += [w, b]
        in_q, w_q = getattr(conv, "_input_quantizer", None), getattr(conv, "_weight_quantizer", None)
        int8_in = self.int8 and _enabled(in_q) and _enabled(w_q)
        attrs: dict = dict(
            ndim=3, in_channels=int(conv.in_channels), out_channels=int(conv.out_channels), groups=1,
            subm=int(bool(conv.subm)), transposed=0, inverse=0, output_bound=OUTPUT_BOUND,
            input_spatial_shape=list(shape), output_spatial_shape=out_shape, kernel_size=ksize, stride=stride,
            padding=padding, dilation=dilation, output_padding=[int(v) for v in conv.output_padding],
            input_shape=[1, int(conv.in_channels)], output_shape=[1, int(conv.out_channels)],
            rulebook=self.rulebook(conv, shape, ksize, name), activation=activation,
            precision="int8" if int8_in else "fp16",
            output_precision="int8" if self.int8 and not last else "fp16",
        )
        in_amax, w_amax = _amax(in_q), _amax(w_q)
        if in_amax is not None:
            attrs["input_dynamic_range"] = in_amax[0]
        if w_amax is not None:
            if len(w_amax) == 1:
                w_amax = w_amax * int(conv.out_channels)
            attrs["weight_dynamic_ranges"] = w_amax
        out = self.tensor()
        self.channels = int(conv.out_channels)
        self.nodes.append(helper.make_node("SparseConvolution", [x, w.name, b.name], [out], name=f"conv{self.convs - 1}", **attrs))
        return out, out_shape

    def rulebook(self, conv: SparseConvolution, shape: list[int], ksize: list[int], name: str) -> str:
        """The conv's indice key; a SubM conv without one shares the key of the SubM convs at
        its resolution (mmdet3d's SparseBasicBlock convs carry none, while the runtime reuses
        indices by key: ``subm<i>`` per stage, as the reference exporter writes them)."""
        if not conv.subm:
            return str(conv.indice_key or name)
        where = (tuple(shape), tuple(ksize))
        key = conv.indice_key or self.subm_keys.get(where) or f"subm{len(self.subm_keys) + 1}"
        self.subm_keys.setdefault(where, key)
        return str(key)

    def add(self, a: str, identity: str, quantizer: TensorQuantizer | None) -> str:
        attrs: dict = {"precision": "int8" if self.int8 and _enabled(quantizer) else "fp16"}
        amax = _amax(quantizer)
        if amax is not None:
            attrs["input0_dynamic_range"] = attrs["input1_dynamic_range"] = amax[0]
        out = self.tensor()
        self.nodes.append(helper.make_node("Add", [a, identity], [out], name=f"add{out}", **attrs))
        return out

    def relu(self, x: str) -> str:
        out = self.tensor()
        self.nodes.append(helper.make_node("Relu", [x], [out], name=f"relu{out}"))
        return out


def _activation(conv: SparseConvolution, followed_by_relu: bool) -> str:
    return "ReLU" if followed_by_relu or getattr(conv, "act_type", Activation.None_) == Activation.ReLU else "None"


def _relu_follows(children: list[nn.Module], index: int) -> bool:
    for module in children[index + 1:]:
        if isinstance(module, _PASS_THROUGH):
            continue
        return isinstance(module, nn.ReLU)
    return False


def _layers(module: nn.Module) -> list[nn.Module]:
    """The encoder's layers in execution order, flattening nested SparseSequentials."""
    if isinstance(module, spconv.SparseSequential):
        return [leaf for child in module._modules.values() for leaf in _layers(child)]
    return [module]


def sparse_encoder_layers(backbone: nn.Module) -> list[nn.Module]:
    """conv_input, every encoder layer, conv_out: the order :meth:`SparseEncoder.forward` runs."""
    return _layers(backbone.conv_input) + _layers(backbone.encoder_layers) + _layers(backbone.conv_out)


def build_scn_graph(backbone: nn.Module, *, int8: bool = True) -> onnx.ModelProto:
    """The "scn" graph of a (BN-folded) sparse encoder; ``int8=False`` writes every layer fp16."""
    layers = sparse_encoder_layers(backbone)
    last_conv = max(i for i, m in enumerate(layers) if isinstance(m, (SparseConvolution, SparseBasicBlock)))
    w = _Writer(int8=int8)
    x, shape = "0", [int(v) for v in backbone.sparse_shape]
    in_channels = None
    skip_relu = False
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.BatchNorm1d):
            raise ExportError("the sparse encoder still holds a BatchNorm1d: fold BN (fuse_bn) before exporting")
        if isinstance(layer, _PASS_THROUGH):
            continue
        if isinstance(layer, nn.ReLU):
            if not skip_relu:
                x = w.relu(x)
            skip_relu = False
            continue
        skip_relu = False
        if isinstance(layer, SparseConvolution):
            in_channels = in_channels or int(layer.in_channels)
            relu = _relu_follows(layers, i)
            x, shape = w.conv(layer, x, shape, _activation(layer, relu), last=i == last_conv)
            skip_relu = relu  # folded into the conv's activation: the ReLU module emits nothing
        elif isinstance(layer, SparseBasicBlock):
            if layer.downsample is not None:
                raise ExportError("a SparseBasicBlock with a downsample branch is not in the scn format")
            in_channels = in_channels or int(layer.conv1.in_channels)
            identity = x
            y, shape = w.conv(layer.conv1, x, shape, "ReLU", last=False)
            y, shape = w.conv(layer.conv2, y, shape, "None", last=i == last_conv)
            x = w.relu(w.add(y, identity, getattr(layer, "add_quantizer", None)))
        else:
            raise ExportError(f"the scn format has no node for {type(layer).__name__} in the sparse encoder")
    channels = w.channels
    nx, ny, nz = shape
    dense = w.tensor()
    w.nodes.append(helper.make_node(
        "ScatterDense", [x], [dense], name="scatter_dense",
        input_spatial_shape=shape, format="xyz", output_shape=[1, channels, nx, ny, nz],
    ))
    moved = w.tensor()
    w.nodes.append(helper.make_node("Transpose", [dense], [moved], name="transpose", dims=[0, 1, 4, 2, 3]))
    out = w.tensor()
    w.nodes.append(helper.make_node("Reshape", [moved], [out], name="reshape", dims=[1, channels * nz, nx, ny]))
    graph = helper.make_graph(
        w.nodes, "scn",
        [helper.make_tensor_value_info("0", TensorProto.FLOAT16, [1, in_channels])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT16, [1, channels * nz, nx, ny])],
        initializer=w.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", SCN_OPSET)],
                              producer_name=PRODUCER[0], producer_version=PRODUCER[1])
    return model


def write_scn(backbone: nn.Module, path: Path, *, int8: bool = True) -> onnx.ModelProto:
    """Write ``lidar.backbone.xyz.onnx`` and check its structure (see :func:`check_scn`)."""
    model = build_scn_graph(backbone, int8=int8)
    check_scn(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    log.info("wrote %s (%d nodes)", path, len(model.graph.node))
    return model


def check_scn(model: onnx.ModelProto) -> None:
    """onnx.checker on everything the format allows it to check.

    The scn format puts custom operators (SparseConvolution, ScatterDense) and custom
    attributes on standard ones (Add's ranges, Transpose/Reshape ``dims``) in the default
    domain, which the node-schema check rejects by design; so the graph's IR is checked
    (initializers, value infos, name binding, topological order) without the schema check.
    """
    try:
        for tensor in model.graph.initializer:
            onnx.checker.check_tensor(tensor)
            if tensor.data_type != TensorProto.FLOAT16:
                raise ExportError(f"scn initializer {tensor.name} is not float16")
        ctx = onnx.checker.C.CheckerContext()
        ctx.ir_version = model.ir_version
        ctx.opset_imports = {o.domain: o.version for o in model.opset_import}
        for info in list(model.graph.input) + list(model.graph.output):
            onnx.checker.check_value_info(info, ctx)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"scn graph fails onnx.checker: {exc}") from None
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        missing = [n for n in node.input if n not in known]
        if missing:
            raise ExportError(f"scn node {node.name} reads {missing} before they are written")
        known.update(node.output)
    if model.graph.output[0].name not in known:
        raise ExportError("scn graph output is never written")
