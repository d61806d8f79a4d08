"""Quantization rules as data: what gets quantized, how, and what is left alone.

A :class:`RuleSet` is read top to bottom: each :class:`Rule` names the float module types it
applies to, the module paths it may touch (glob patterns), and the quantized class with its
input and weight descriptors. :func:`bevfusion_ptq.quant.insert.insert_quantizers` applies
a rule set generically; nothing here knows how to walk a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import spconv.pytorch as spconv
from pytorch_quantization.tensor_quant import QuantDescriptor
from torch import nn

from bevfusion_ptq.quant import modules as qm

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

Quantize = Callable[[nn.Module, QuantDescriptor, QuantDescriptor], nn.Module]


@dataclass(frozen=True)
class Rule:
    """Replace each module of ``types`` at a path matching ``paths`` with ``quantize(...)``."""

    name: str
    types: tuple[type[nn.Module], ...]
    quantize: Quantize
    input: Quant = ACTIVATION
    weight: Quant = WEIGHT_PER_CHANNEL
    paths: tuple[str, ...] = ("*",)
    required: bool = True  # a rule that matches nothing is a model/rules mismatch


@dataclass(frozen=True)
class RuleSet:
    """Rules, plus module paths that stay float and quantizers disabled after calibration."""

    name: str
    rules: tuple[Rule, ...]
    keep_float: tuple[str, ...] = ()  # subtrees no rule may touch (glob on module path)
    exclude: tuple[str, ...] = ()  # quantizers calibrated, then disabled (glob on module path)
    notes: dict[str, str] = field(default_factory=dict)


def default_rules(exclude: tuple[str, ...] | None = None) -> RuleSet:
    """Every Conv2d and every spconv conv quantized; the reference's two exclusions."""
    return RuleSet(
        name="bevfusion-conv",
        rules=(
            Rule("dense-conv", (nn.Conv2d,), qm.quantize_conv2d),
            Rule("sparse-conv", (spconv.SubMConv3d, spconv.SparseConv3d), qm.quantize_sparse_conv),
        ),
        keep_float=KEEP_FLOAT,
        exclude=DEFAULT_EXCLUDE if exclude is None else exclude,
    )


# The reference leaves these in floating point (TensorRT runs them in FP16): the BEV
# downsample after the view transform, and the whole detection head.
KEEP_FLOAT: tuple[str, ...] = (
    "encoders.camera.vtransform.downsample",
    "heads",
)

# The reference disables these after calibration: the raw voxel features entering the lidar
# backbone, and the 1x1 conv of the first decoder deblock.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "encoders.lidar.backbone.conv_input.0",
    "decoder.neck.deblocks.0.0",
)
