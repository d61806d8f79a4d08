"""Fold BatchNorm into the convolution before it, as the reference does before calibrating.

Dense: every BN that directly follows a Conv2d (quantized or not). ConvTranspose2d + BN is
left alone, as in the reference. Sparse: BN1d into every spconv conv it follows. The BN
module is replaced by ``nn.Identity`` so the containing module's forward is unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import spconv.pytorch as spconv
from spconv.pytorch.conv import SparseConvolution
import torch
from pytorch_quantization import nn as quant_nn
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from bevfusion_ptq.quant.modules import with_bias_support

log = logging.getLogger(__name__)

_DENSE_CONV = (nn.Conv2d, quant_nn.QuantConv2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(bn, _BN) or not bn.track_running_stats:
        return False
    if isinstance(conv, SparseConvolution):
        return isinstance(bn, nn.BatchNorm1d) and not conv.transposed
    return isinstance(conv, _DENSE_CONV)


def _pairs(module: nn.Module) -> Iterator[tuple[nn.Module, str, str]]:
    """(owner, conv attribute, bn attribute) for every conv->BN pair owned by ``module``.

    Three shapes occur in OpenMMLab models: adjacent entries of a Sequential (and spconv's
    SparseSequential), ConvModule's ``conv``/``norm_name``, and ResNet-style blocks with
    ``conv{i}``/``norm{i}_name`` (mmdet's Bottleneck and BasicBlock, mmdet3d's SparseBasicBlock,
    the ResNet stem).
    """
    if isinstance(module, (nn.Sequential, spconv.SparseSequential)):
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            yield module, a, b
        return
    if hasattr(module, "conv") and isinstance(getattr(module, "norm_name", None), str):
        yield module, "conv", module.norm_name
    for i in range(1, 4):
        conv_name, norm_attr = f"conv{i}", f"norm{i}_name"
        if hasattr(module, conv_name) and isinstance(getattr(module, norm_attr, None), str):
            yield module, conv_name, getattr(module, norm_attr)


@torch.no_grad()
def _fold(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    weight, bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    # spconv 2 weights are [Cout, k, k, k, Cin] and dense ones [Cout, Cin, k, k]: the output
    # channel is dim 0 in both, which is what fuse_conv_bn_weights scales.
    conv.weight = weight
    conv.bias = bias


def fuse_bn(model: nn.Module) -> int:
    """Fold every eligible BN into its conv, in place; returns how many were folded.

    The model must be in eval mode semantics: folding uses BN running statistics, so the
    fused model equals the unfused one in eval mode only.
    """
    folded = 0
    for _, owner in list(model.named_modules()):
        for parent, conv_attr, bn_attr in list(_pairs(owner)):
            conv, bn = getattr(parent, conv_attr, None), getattr(parent, bn_attr, None)
            if conv is None or bn is None or not _foldable(conv, bn):
                continue
            if isinstance(conv, SparseConvolution):
                conv = with_bias_support(conv)
                setattr(parent, conv_attr, conv)
            _fold(conv, bn)
            setattr(parent, bn_attr, nn.Identity())
            folded += 1
    log.info("folded %d BatchNorm layers into convolutions", folded)
    return folded
