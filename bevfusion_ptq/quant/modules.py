"""Quantized module classes that replace float modules through the rules.

Every quantized behaviour lives in a class here (or in pytorch-quantization), never in a
``forward`` assigned at run time. Replacement keeps the float module's parameters and
buffers (the same tensor objects) and only changes its class and adds quantizers, so a
state dict of the float model still names the same weights afterwards.
"""

from __future__ import annotations

from typing import TypeVar

import spconv.pytorch as spconv
import torch
from cumm.tensorview.gemm import Activation
from spconv.pytorch.conv import SparseConvolution, _apply_act
from pytorch_quantization import nn as quant_nn
from pytorch_quantization.tensor_quant import QuantDescriptor
from torch import nn

from bevfusion_ptq.sparse_cpu import sparse_convs_on

M = TypeVar("M", bound=nn.Module)


def adopt(float_module: nn.Module, quant_cls: type[M]) -> M:
    """A ``quant_cls`` instance that shares all state of ``float_module``.

    ``quant_cls`` must be a subclass of the float module's class (or accept its state), so
    nothing is re-initialised and no weight is copied.
    """
    quant = quant_cls.__new__(quant_cls)
    quant.__dict__.update(float_module.__dict__)
    for attr in ("_parameters", "_buffers", "_modules"):
        setattr(quant, attr, dict(getattr(float_module, attr)))
    return quant


def attach_quantizers(
    module: nn.Module, input_desc: QuantDescriptor | None, weight_desc: QuantDescriptor | None
) -> None:
    """Give ``module`` its ``_input_quantizer`` / ``_weight_quantizer``, as QuantMixin names them."""
    module._fake_quant = True
    if input_desc is not None:
        module.add_module("_input_quantizer", quant_nn.TensorQuantizer(input_desc))
    if weight_desc is not None:
        module.add_module("_weight_quantizer", quant_nn.TensorQuantizer(weight_desc))


class _SparseConvForward:
    """spconv 2 forward that is correct on the CPU, bias and recorded activation included.

    spconv fuses the bias into its kernel in eval mode and its CPU path refuses that ("cpu
    don't support act and bias"), yet every sparse conv has a bias once BN is folded into
    it. On the CPU the bias is added to the output features instead, which is the same sum,
    and the conv runs single-threaded with spconv's Native algorithm, whichever spconv build
    is installed (see :mod:`bevfusion_ptq.sparse_cpu`).

    ``act_type`` (set by :func:`bevfusion_ptq.quant.fold_relu.fold_relu` for the exporter) is
    applied here after the bias rather than inside spconv's kernel: the CPU kernel refuses
    it, and spconv 2.3.8 passes ``act_type`` in place of ``act_alpha`` for strided convs.
    """

    def _sparse_forward(self, input: spconv.SparseConvTensor, weight: torch.Tensor, add_input=None):  # noqa: A002
        bias = self.bias
        fused_bias = bias if (bias is None or input.features.is_cuda) else None
        with sparse_convs_on(self, input.features.device):
            out = self._conv_forward(
                self.training,
                input,
                weight,
                fused_bias,
                add_input,
                name=self.name,
                sparse_unique_name=self._sparse_unique_name,
                act_type=Activation.None_,
                act_alpha=self.act_alpha,
                act_beta=self.act_beta,
            )
        if bias is not None and fused_bias is None:
            out = out.replace_feature(out.features + bias)
        if self.act_type != Activation.None_:
            out = out.replace_feature(_apply_act(out.features, self.act_type, self.act_alpha, self.act_beta))
        return out

    def forward(self, input: spconv.SparseConvTensor, add_input=None):  # noqa: A002 - spconv's name
        return self._sparse_forward(input, self.weight, add_input)


class FusedSubMConv3d(_SparseConvForward, spconv.SubMConv3d):
    """A float SubM conv that received a folded BN (and so a bias)."""


class FusedSparseConv3d(_SparseConvForward, spconv.SparseConv3d):
    """A float strided sparse conv that received a folded BN (and so a bias)."""


class _QuantSparseForward(_SparseConvForward):
    """Fake-quantized spconv 2 forward: features and weight quantized, weight never written.

    The reference assigns the fake-quantized weight back into ``self.weight`` on every call,
    so repeated forwards quantize an already-quantized weight and a saved model no longer
    holds the float weights. Here the quantized weight is a temporary passed to spconv.
    """

    def forward(self, input: spconv.SparseConvTensor, add_input=None):  # noqa: A002 - spconv's name
        features = self._input_quantizer(input.features)
        weight = self._weight_quantizer(self.weight)
        return self._sparse_forward(input.replace_feature(features), weight, add_input)


class QuantSubMConv3d(_QuantSparseForward, spconv.SubMConv3d):
    """Submanifold sparse conv with an input (features) and per-output-channel weight quantizer."""


class QuantSparseConv3d(_QuantSparseForward, spconv.SparseConv3d):
    """Strided sparse conv with an input (features) and per-output-channel weight quantizer."""


def with_bias_support(module: SparseConvolution) -> SparseConvolution:
    """The module itself if its forward handles a bias on any device, else its Fused twin."""
    if isinstance(module, _SparseConvForward):
        return module
    return adopt(module, FusedSubMConv3d if module.subm else FusedSparseConv3d)


def quantize_conv2d(
    module: nn.Conv2d, input_desc: QuantDescriptor, weight_desc: QuantDescriptor
) -> quant_nn.QuantConv2d:
    """pytorch-quantization's QuantConv2d over the same weights."""
    quant = adopt(module, quant_nn.QuantConv2d)
    attach_quantizers(quant, input_desc, weight_desc)
    return quant


def quantize_conv_transpose2d(
    module: nn.ConvTranspose2d, input_desc: QuantDescriptor, weight_desc: QuantDescriptor
) -> quant_nn.QuantConvTranspose2d:
    """pytorch-quantization's QuantConvTranspose2d over the same weights."""
    quant = adopt(module, quant_nn.QuantConvTranspose2d)
    attach_quantizers(quant, input_desc, weight_desc)
    return quant


def quantize_sparse_conv(
    module: SparseConvolution, input_desc: QuantDescriptor, weight_desc: QuantDescriptor
) -> SparseConvolution:
    """Our quantized spconv 2 conv; SubM stays SubM, strided stays strided."""
    quant_cls = QuantSubMConv3d if module.subm else QuantSparseConv3d
    quant = adopt(module, quant_cls)
    attach_quantizers(quant, input_desc, weight_desc)
    return quant


def is_quantized(module: nn.Module) -> bool:
    """True for a module that already carries quantizers (rules are applied once)."""
    return hasattr(module, "_input_quantizer") or isinstance(module, quant_nn.TensorQuantizer)


__all__ = [
    "FusedSparseConv3d",
    "FusedSubMConv3d",
    "QuantSparseConv3d",
    "QuantSubMConv3d",
    "adopt",
    "attach_quantizers",
    "is_quantized",
    "quantize_conv2d",
    "quantize_conv_transpose2d",
    "quantize_sparse_conv",
    "with_bias_support",
]
