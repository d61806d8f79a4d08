"""head.bbox.onnx: the TransFusion head with the six outputs the runtime decodes.

Outputs ``[1, k, P]`` (P = proposals): ``score`` (sigmoid of the class logits times the
query's heatmap peak score times the one-hot of its label, so the runtime's argmax gives the
label and the score at once), ``rot`` (sin, cos), ``dim`` (log size), ``reg`` (BEV centre in
cells, query position included), ``height`` (centre z), ``vel``.

Two LayerNorm forms, same weights:

- ``plain``: ``aten::layer_norm`` as opset 13 decomposes it (ReduceMean/Sub/Pow/...); TensorRT
  8.6+ recognises the pattern and runs its own normalization layer, no plugin needed.
- ``plugin``: one ``CustomLayerNormalization`` node in the ``nv`` domain (attributes ``axis``
  -1 and ``epsilon``), which CUDA-BEVFusion's LayerNorm plugin (version "1") implements for
  3-D inputs normalized over the last axis.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.onnx import symbolic_helper, symbolic_opset14

from bevfusion_ptq.errors import ExportError
from bevfusion_ptq.export.common import OPSET

LayerNormForm = Literal["plain", "plugin"]
PLUGIN_DOMAIN = "nv"
PLUGIN_OP = "CustomLayerNormalization"
OUTPUTS = ("score", "rot", "dim", "reg", "height", "vel")


class HeadGraph(nn.Module):
    """``middle`` -> score, rot, dim, reg, height, vel (see the module docstring)."""

    input_names = ("middle",)
    output_names = OUTPUTS

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.head = model.heads["object"]

    def forward(self, middle: Tensor) -> tuple[Tensor, ...]:
        preds = self.head(middle)
        one_hot = F.one_hot(preds["query_labels"], self.head.num_classes).permute(0, 2, 1).to(middle.dtype)
        score = preds["heatmap"].sigmoid() * preds["query_heatmap_score"] * one_hot
        return score, preds["rot"], preds["dim"], preds["center"], preds["height"], preds["vel"]


def _plugin_layer_norm(g, inputs, normalized_shape, weight, bias, eps, cudnn_enable):  # noqa: ANN001
    shape = symbolic_helper._maybe_get_const(normalized_shape, "is")
    if len(shape) != 1:
        raise ExportError(f"the LayerNorm plugin normalizes the last axis only, not {shape}")
    epsilon = float(symbolic_helper._maybe_get_const(eps, "f"))
    out = g.op(f"{PLUGIN_DOMAIN}::{PLUGIN_OP}", inputs, weight, bias, axis_i=-1, epsilon_f=epsilon)
    out.setType(inputs.type())  # same shape and type as the input: keeps every later shape static
    return out


@contextlib.contextmanager
def layer_norm_form(form: LayerNormForm) -> Iterator[None]:
    """Export LayerNorm as ``form`` (and attention as opset-13 ops) for the duration of the block.

    ``nn.MultiheadAttention`` calls ``scaled_dot_product_attention``, whose TorchScript symbolic
    is registered from opset 14 on although, without a causal mask, it emits only opset-13
    operators (Transpose, Mul, Sqrt, MatMul, Softmax); it is registered for opset 13 here.
    """
    if form not in ("plain", "plugin"):
        raise ExportError(f"unknown LayerNorm form {form!r}; use 'plain' or 'plugin'")
    registered = [("aten::scaled_dot_product_attention", symbolic_opset14.scaled_dot_product_attention)]
    if form == "plugin":
        registered.append(("aten::layer_norm", _plugin_layer_norm))
    for name, fn in registered:
        torch.onnx.register_custom_op_symbolic(name, fn, OPSET)
    try:
        yield
    finally:
        for name, _ in registered:
            torch.onnx.unregister_custom_op_symbolic(name, OPSET)


def decode_outputs(head: nn.Module, outputs: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
    """Boxes from the six outputs, as the runtime decodes them (S/head-transbbox.cu), in the
    format of :meth:`TransFusionHead.decode`: label = argmax of ``score``, score = its max."""
    score, label = outputs["score"].max(dim=1)
    preds = {
        "query_labels": label,
        # decode() multiplies sigmoid(heatmap) by the peak score: give it logit(score) and 1.
        "heatmap": torch.logit(outputs["score"].clamp(1e-7, 1 - 1e-7)),
        "query_heatmap_score": torch.ones_like(outputs["score"]),
        "center": outputs["reg"],
        "height": outputs["height"],
        "dim": outputs["dim"],
        "rot": outputs["rot"],
        "vel": outputs["vel"],
    }
    return head.decode(preds)
