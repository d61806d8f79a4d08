"""Quantized residual blocks and concatenation, as classes the rules swap in.

The reference gets the same placement by assigning ``forward`` on live objects
(``hook_bottleneck_forward``, ``hook_generalized_lss_fpn_forward``) and by attaching a
``quant_add`` attribute that a patched SparseBasicBlock forward looks for. Here each
quantized behaviour is a subclass of the float module, adopted over the float module's state
(:func:`~bevfusion_ptq.quant.modules.adopt`), so the model can be read from its classes and
the conv/BN attribute names BN fusion relies on (``conv{i}``, ``norm{i}_name``) stay put.

Sharing inside one block is the block's own business: :meth:`QuantBottleneck.share_quantizers`
wires conv1/downsample/identity once the convolutions inside it carry quantizers (the
applier calls it after its walk). Sharing across modules (the neck's concat groups) is data:
:class:`~bevfusion_ptq.quant.rules.ShareGroup`.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint as cp
from mmdet.models.backbones.resnet import Bottleneck
from mmdet3d.models.layers.sparse_block import SparseBasicBlock
from mmdet3d.models.layers.spconv import IS_SPCONV2_AVAILABLE
from pytorch_quantization import nn as quant_nn
from pytorch_quantization.tensor_quant import QuantDescriptor
from torch import Tensor, nn

from bevfusion_ptq.errors import QuantizationRuleError
from bevfusion_ptq.model.camera import Concat
from bevfusion_ptq.quant.modules import adopt

if IS_SPCONV2_AVAILABLE:
    from spconv.pytorch import SparseConvTensor
else:  # pragma: no cover - mmcv's spconv 1.x port, CUDA only
    from mmcv.ops import SparseConvTensor


def _input_quantizer(module: nn.Module | None, what: str, block: str) -> quant_nn.TensorQuantizer:
    quantizer = getattr(module, "_input_quantizer", None)
    if not isinstance(quantizer, quant_nn.TensorQuantizer):
        raise QuantizationRuleError(
            f"{block}: {what} ({type(module).__name__}) has no input quantizer; the residual "
            "sharing needs it quantized (is it kept float, or does no rule match it?)"
        )
    return quantizer


class QuantBottleneck(Bottleneck):
    """mmdet's ResNet Bottleneck with a quantizer on the identity branch of its residual add.

    After :meth:`share_quantizers` (the reference's placement):

    * with a downsample: ``downsample[0]`` uses conv1's input quantizer (both read the
      block input), and ``residual_quantizer`` is the block's own quantizer on the
      downsample output;
    * without: ``residual_quantizer`` *is* conv1's input quantizer (the identity is the
      block input that conv1 reads).

    The main branch output is not quantized before the add, as in the reference.
    """

    residual_quantizer: quant_nn.TensorQuantizer

    def share_quantizers(self, path: str = "") -> None:
        """Wire the block-local sharing; call once the convs inside carry quantizers."""
        block = path or type(self).__name__
        major = _input_quantizer(self.conv1, "conv1", block)
        if self.downsample is None:
            self.residual_quantizer = major
            return
        first = self.downsample[0] if isinstance(self.downsample, nn.Sequential) else self.downsample
        _input_quantizer(first, "downsample[0]", block)
        first._input_quantizer = major

    def forward(self, x: Tensor) -> Tensor:
        def _inner_forward(x: Tensor) -> Tensor:
            identity = x
            out = self.relu(self.norm1(self.conv1(x)))
            if self.with_plugins:
                out = self.forward_plugin(out, self.after_conv1_plugin_names)
            out = self.relu(self.norm2(self.conv2(out)))
            if self.with_plugins:
                out = self.forward_plugin(out, self.after_conv2_plugin_names)
            out = self.norm3(self.conv3(out))
            if self.with_plugins:
                out = self.forward_plugin(out, self.after_conv3_plugin_names)
            if self.downsample is not None:
                identity = self.downsample(x)
            return out + self.residual_quantizer(identity)

        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(_inner_forward, x)
        else:
            out = _inner_forward(x)
        return self.relu(out)


class QuantSparseBasicBlock(SparseBasicBlock):
    """mmdet3d's SparseBasicBlock whose residual add quantizes both operands with one quantizer.

    Otherwise mmdet3d's forward, step for step (the reference's ``QuantAdd``).
    """

    add_quantizer: quant_nn.TensorQuantizer

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        identity = x.features
        assert x.features.dim() == 2, f"x.features.dim()={x.features.dim()}"
        out = self.conv1(x)
        out = out.replace_feature(self.norm1(out.features))
        out = out.replace_feature(self.relu(out.features))
        out = self.conv2(out)
        out = out.replace_feature(self.norm2(out.features))
        if self.downsample is not None:
            identity = self.downsample(x).features
        out = out.replace_feature(self.add_quantizer(out.features) + self.add_quantizer(identity))
        return out.replace_feature(self.relu(out.features))


class QuantConcat(Concat):
    """Concatenation with one input quantizer applied to every input (one scale for all)."""

    _input_quantizer: quant_nn.TensorQuantizer

    def forward(self, *tensors: Tensor) -> Tensor:
        return torch.cat([self._input_quantizer(t) for t in tensors], dim=self.dim)


def _with_quantizer(module: nn.Module, cls: type, attr: str, desc: QuantDescriptor) -> nn.Module:
    quant = adopt(module, cls)
    quant._fake_quant = True
    quant.add_module(attr, quant_nn.TensorQuantizer(desc))
    return quant


def quantize_bottleneck(module: Bottleneck, input_desc: QuantDescriptor, _weight_desc=None) -> QuantBottleneck:
    """QuantBottleneck over the same state; its residual quantizer is ``input_desc``.

    Until :meth:`QuantBottleneck.share_quantizers` runs, a block without downsample has its
    own identity quantizer; the applier replaces it with conv1's.
    """
    return _with_quantizer(module, QuantBottleneck, "residual_quantizer", input_desc)


def quantize_sparse_basic_block(
    module: SparseBasicBlock, input_desc: QuantDescriptor, _weight_desc=None
) -> QuantSparseBasicBlock:
    """QuantSparseBasicBlock over the same state, with an ``add_quantizer`` of ``input_desc``."""
    return _with_quantizer(module, QuantSparseBasicBlock, "add_quantizer", input_desc)


def quantize_concat(module: Concat, input_desc: QuantDescriptor, _weight_desc=None) -> QuantConcat:
    """QuantConcat over the same module, one ``_input_quantizer`` of ``input_desc``."""
    return _with_quantizer(module, QuantConcat, "_input_quantizer", input_desc)


__all__ = [
    "QuantBottleneck",
    "QuantConcat",
    "QuantSparseBasicBlock",
    "quantize_bottleneck",
    "quantize_concat",
    "quantize_sparse_basic_block",
]
