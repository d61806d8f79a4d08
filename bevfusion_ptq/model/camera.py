"""Camera image encoder parts: a ResNet with a small extra depth, and the LSS FPN neck.

The ResNet itself is mmdet's (torchvision-style Bottleneck, ``style='pytorch'``), so the
quantization rules can target mmdet's ``Bottleneck`` class in both the reference model and
the tiny test model. The neck is written here: mmdet has no FPN that concatenates the
upsampled deeper level with the shallower one before the lateral conv.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmdet.models.backbones.resnet import Bottleneck, ResNet
from mmdet3d.registry import MODELS
from mmengine.model import BaseModule
from torch import Tensor, nn


@MODELS.register_module()
class BEVResNet(ResNet):
    """mmdet ``ResNet`` plus depth 14: one Bottleneck per stage.

    Depth 14 (3 * 4 + 2 layers) keeps every structural feature that quantization cares
    about (a downsample branch in each stage's first block, residual adds, four stages)
    at a fraction of the cost, for the ``bevfusion-tiny`` config. All other depths are
    mmdet's own.
    """

    arch_settings = {**ResNet.arch_settings, 14: (Bottleneck, (1, 1, 1, 1))}


class Concat(nn.Module):
    """Channel concatenation as a module without parameters.

    Being a module gives it a path (``neck.concats.0``), so a quantized concatenation
    (one input quantizer shared by all inputs) can be swapped in by name.
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *tensors: Tensor) -> Tensor:
        return torch.cat(tensors, dim=self.dim)


@MODELS.register_module()
class GeneralizedLSSFPN(BaseModule):
    """Top-down FPN that concatenates instead of adding.

    For each level ``i`` from the second deepest up: upsample the deeper output to level
    ``i``'s size, concatenate ``[level i, upsampled]``, then a 1x1 lateral ConvModule and
    a 3x3 fpn ConvModule. The deepest input is used raw, so lateral ``i`` sees
    ``in_channels[i] + in_channels[i + 1]`` for the deepest pair and
    ``in_channels[i] + out_channels`` otherwise. Returns one map per level except the
    deepest, shallowest first.

    Args:
        in_channels: channels of the backbone levels, shallowest first.
        out_channels: channels of every output.
        norm_cfg, act_cfg: for the ConvModules (conv without bias when normed).
        upsample_cfg: ``F.interpolate`` keyword arguments (size is taken from the target).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        norm_cfg: dict | None = None,
        act_cfg: dict | None = None,
        upsample_cfg: dict | None = None,
        init_cfg: dict | list | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if len(in_channels) < 2:
            raise ValueError(f"GeneralizedLSSFPN needs at least 2 input levels, got {in_channels}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        norm_cfg = dict(type="BN2d") if norm_cfg is None else norm_cfg
        act_cfg = dict(type="ReLU") if act_cfg is None else act_cfg
        self.upsample_cfg = (
            dict(mode="bilinear", align_corners=False) if upsample_cfg is None else dict(upsample_cfg)
        )
        levels = len(self.in_channels) - 1
        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        self.concats = nn.ModuleList()
        for i in range(levels):
            deeper = self.in_channels[i + 1] if i == levels - 1 else out_channels
            self.lateral_convs.append(
                ConvModule(
                    self.in_channels[i] + deeper,
                    out_channels,
                    1,
                    norm_cfg=norm_cfg,
                    act_cfg=act_cfg,
                    inplace=False,
                )
            )
            self.fpn_convs.append(
                ConvModule(
                    out_channels,
                    out_channels,
                    3,
                    padding=1,
                    norm_cfg=norm_cfg,
                    act_cfg=act_cfg,
                    inplace=False,
                )
            )
            self.concats.append(Concat(dim=1))

    def upsample(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """Resize the deeper map to the shallower one's spatial size."""
        return F.interpolate(x, size=tuple(size), **self.upsample_cfg)

    def forward(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(
                f"GeneralizedLSSFPN expects {len(self.in_channels)} levels, got {len(inputs)}"
            )
        feats = list(inputs)
        for i in range(len(feats) - 2, -1, -1):
            deeper = self.upsample(feats[i + 1], feats[i].shape[-2:])
            x = self.concats[i](feats[i], deeper)
            x = self.lateral_convs[i](x)
            feats[i] = self.fpn_convs[i](x)
        return feats[:-1]
