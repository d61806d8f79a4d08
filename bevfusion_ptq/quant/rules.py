"""Quantization rules as data: what gets quantized, how, and what is left alone.

A :class:`RuleSet` is read top to bottom: each :class:`Rule` names the float module types it
applies to, the module paths it may touch (glob patterns), and the quantized class with its
input and weight descriptors. :class:`ShareGroup` entries name modules whose input
quantizers must be one object. :func:`bevfusion_ptq.quant.insert.insert_quantizers` applies
a rule set generically; nothing here knows how to walk a model.

Two rule sets: :func:`bevfusion_rules` is the reference's placement for BEVFusion (used by the
pipeline); :func:`default_rules` quantizes every conv of any model (tests, other models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import spconv.pytorch as spconv
from mmcv.cnn.bricks.wrappers import ConvTranspose2d as MMCVConvTranspose2d
from mmdet.models.backbones.resnet import Bottleneck
from mmdet3d.models.layers.sparse_block import SparseBasicBlock
from pytorch_quantization.tensor_quant import QuantDescriptor
from torch import nn

from bevfusion_ptq.model.camera import Concat
from bevfusion_ptq.quant import blocks as qb
from bevfusion_ptq.quant import modules as qm
from bevfusion_ptq.quant.defaults import DEFAULT_EXCLUDE

Calibrator = Literal["histogram", "max"]


@dataclass(frozen=True)
class Quant:
    """One quantizer's descriptor: bits, per-tensor (axis None) or per-channel axis, calibrator."""

    num_bits: int = 8
    axis: int | None = None
    calibrator: Calibrator = "histogram"

    def descriptor(self) -> QuantDescriptor:
        axis = None if self.axis is None else (self.axis,)
        return QuantDescriptor(num_bits=self.num_bits, axis=axis, calib_method=self.calibrator)


# The reference's descriptors: 8-bit signed; activations per tensor with a 2048-bin
# histogram, weights per output channel with max.
ACTIVATION = Quant(8, None, "histogram")
WEIGHT_PER_CHANNEL = Quant(8, 0, "max")

Quantize = Callable[[nn.Module, QuantDescriptor, "QuantDescriptor | None"], nn.Module]


@dataclass(frozen=True)
class Rule:
    """Replace each module of ``types`` at a path matching ``paths`` with ``quantize(...)``."""

    name: str
    types: tuple[type[nn.Module], ...]
    quantize: Quantize
    input: Quant = ACTIVATION
    weight: Quant | None = WEIGHT_PER_CHANNEL  # None: the quantized module has no weight quantizer
    paths: tuple[str, ...] = ("*",)
    required: bool = True  # a rule that matches nothing is a model/rules mismatch


@dataclass(frozen=True)
class ShareGroup:
    """Modules whose input quantizers (``_input_quantizer``) must be one object.

    After the swaps, every reference to a member's quantizer is replaced by the first
    member's, so one scale serves them all (TensorRT then needs no reformat between them).
    """

    name: str
    members: tuple[str, ...]  # module paths, exact


@dataclass(frozen=True)
class RuleSet:
    """Rules, share groups, module paths that stay float, quantizers disabled after calibration."""

    name: str
    rules: tuple[Rule, ...]
    share: tuple[ShareGroup, ...] = ()
    keep_float: tuple[str, ...] = ()  # subtrees no rule may touch (glob on module path)
    exclude: tuple[str, ...] = ()  # quantizers calibrated, then disabled (glob on module path)
    notes: dict[str, str] = field(default_factory=dict)


def default_rules(exclude: tuple[str, ...] | None = None) -> RuleSet:
    """Every conv of any model quantized (dense, transposed, sparse); no blocks, no sharing."""
    return RuleSet(
        name="generic-conv",
        rules=(
            Rule("dense-conv", (nn.Conv2d,), qm.quantize_conv2d),
            Rule("dense-deconv", _DECONV, qm.quantize_conv_transpose2d, required=False),
            Rule("sparse-conv", _SPARSE_CONV, qm.quantize_sparse_conv),
        ),
        keep_float=KEEP_FLOAT,
        exclude=DEFAULT_EXCLUDE if exclude is None else exclude,
    )


def bevfusion_rules(exclude: tuple[str, ...] | None = None) -> RuleSet:
    """The reference's placement for BEVFusion with a ResNet camera backbone and LSS FPN neck.

    Every rule is required: another backbone fails naming the rule that found nothing. A
    Bottleneck's own sharing (downsample[0] and, without downsample, the identity reuse
    conv1's input quantizer) is local to one block and lives in
    :class:`~bevfusion_ptq.quant.blocks.QuantBottleneck`; sharing across modules is listed
    in :data:`BEVFUSION_SHARE`.
    """
    return RuleSet(
        name="bevfusion-reference",
        rules=(
            Rule("dense-conv", (nn.Conv2d,), qm.quantize_conv2d, paths=DENSE_PATHS),
            Rule("dense-deconv", _DECONV, qm.quantize_conv_transpose2d, paths=("decoder",)),
            Rule("bottleneck-residual", (Bottleneck,), qb.quantize_bottleneck, weight=None,
                 paths=("encoders.camera.backbone",)),
            Rule("neck-concat", (Concat,), qb.quantize_concat, weight=None, paths=("encoders.camera.neck",)),
            Rule("sparse-conv", _SPARSE_CONV, qm.quantize_sparse_conv, paths=("encoders.lidar.backbone",)),
            Rule("sparse-block-add", (SparseBasicBlock,), qb.quantize_sparse_basic_block, weight=None,
                 paths=("encoders.lidar.backbone",)),
        ),
        share=BEVFUSION_SHARE,
        keep_float=KEEP_FLOAT,
        exclude=DEFAULT_EXCLUDE if exclude is None else exclude,
    )


_DECONV: tuple[type[nn.Module], ...] = (nn.ConvTranspose2d, MMCVConvTranspose2d)
_SPARSE_CONV: tuple[type[nn.Module], ...] = (spconv.SubMConv3d, spconv.SparseConv3d)

# Where the reference turns every Conv2d into a quantized conv.
DENSE_PATHS: tuple[str, ...] = (
    "encoders.camera.backbone",
    "encoders.camera.neck",
    "encoders.camera.vtransform.dtransform",
    "encoders.camera.vtransform.depthnet",
    "fuser",
    "decoder",
)

# The reference's scale sharing: the input of layer3 (layer2's output) is also the shallow
# input of the concat feeding lateral 0, whose output the lateral conv reads; likewise
# layer4 with the concat feeding lateral 1. (Its quant_concat1 / quant_concat0 are our
# concats.0 / concats.1: concats[i] feeds lateral_convs[i].)
_BACKBONE, _NECK = "encoders.camera.backbone", "encoders.camera.neck"
BEVFUSION_SHARE: tuple[ShareGroup, ...] = (
    ShareGroup("layer3-lateral0", (
        f"{_BACKBONE}.layer3.0.conv1", f"{_NECK}.concats.0", f"{_NECK}.lateral_convs.0.conv",
        f"{_BACKBONE}.layer3.0.downsample.0",
    )),
    ShareGroup("layer4-lateral1", (
        f"{_BACKBONE}.layer4.0.conv1", f"{_NECK}.concats.1", f"{_NECK}.lateral_convs.1.conv",
        f"{_BACKBONE}.layer4.0.downsample.0",
    )),
)


# The reference leaves these in floating point (TensorRT runs them in FP16): the BEV
# downsample after the view transform, and the whole detection head.
KEEP_FLOAT: tuple[str, ...] = (
    "encoders.camera.vtransform.downsample",
    "heads",
)
