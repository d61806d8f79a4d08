"""Record each sparse conv's following ReLU on the conv, for the sparse-network exporter.

CUDA-BEVFusion's exporter reads ``act_type`` from every spconv conv and emits the ReLU inside
the conv layer. The reference sets ``act_type`` and then *drops* the ReLU modules, so after
its folding step the PyTorch forward of the lidar backbone no longer applies them and any
evaluation of that model is wrong. Here the ReLU modules stay: our sparse conv forward
applies ``act_type`` itself (:class:`~bevfusion_ptq.quant.modules._SparseConvForward`), and a
ReLU after a ReLU changes nothing, so the folded model is numerically the unfolded one.

Pairs recognised (after BN folding, when the BN between them is an ``nn.Identity``):

- conv -> [BN/Identity] -> ReLU inside a ``SparseSequential`` (conv_input, the strided
  downsamples, conv_out);
- ``conv1`` of a SparseBasicBlock (conv1 -> bn1 -> relu). ``conv2`` is followed by the
  residual add, not directly by the ReLU, so it keeps no activation (the exporter fuses
  add + ReLU itself).
"""

from __future__ import annotations

import logging

import spconv.pytorch as spconv
from cumm.tensorview.gemm import Activation
from mmdet3d.models.layers.sparse_block import SparseBasicBlock
from spconv.pytorch.conv import SparseConvolution
from torch import nn

from bevfusion_ptq.quant.modules import with_bias_support

log = logging.getLogger(__name__)

_PASS_THROUGH = (nn.Identity, nn.BatchNorm1d)


def _relu_after(children: list[nn.Module], index: int) -> bool:
    for module in children[index + 1:]:
        if isinstance(module, _PASS_THROUGH):
            continue
        return isinstance(module, nn.ReLU)
    return False


def _mark(owner: nn.Module, attr: str, path: str, folded: list[str]) -> None:
    conv = with_bias_support(getattr(owner, attr))
    owner._modules[attr] = conv
    conv.act_type = Activation.ReLU
    folded.append(path)


def fold_relu(model: nn.Module) -> list[str]:
    """Set ``act_type=ReLU`` on every sparse conv directly followed by a ReLU; returns their paths.

    Convs whose forward cannot apply ``act_type`` on every device are first swapped for
    their bias-capable twins (same parameters), so the recorded activation is never applied
    twice by spconv's kernel nor refused on the CPU.
    """
    folded: list[str] = []
    for path, module in list(model.named_modules()):
        prefix = f"{path}." if path else ""
        if isinstance(module, spconv.SparseSequential):
            names = list(module._modules)
            children = [module._modules[n] for n in names]
            for i, (name, child) in enumerate(zip(names, children)):
                if isinstance(child, SparseConvolution) and _relu_after(children, i):
                    _mark(module, name, prefix + name, folded)
        elif isinstance(module, SparseBasicBlock) and isinstance(module.conv1, SparseConvolution):
            _mark(module, "conv1", prefix + "conv1", folded)
    log.info("recorded act_type=ReLU on %d sparse convs for export (ReLU modules kept)", len(folded))
    return folded


def activation_name(module: nn.Module) -> str | None:
    """``"ReLU"`` for a conv with a recorded activation, None otherwise (for reports)."""
    act = getattr(module, "act_type", None)
    if act is None or act == Activation.None_:
        return None
    return str(act).rpartition(".")[2]
