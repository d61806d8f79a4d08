"""ConvFuser: concatenate the camera and lidar BEV maps and mix them with one conv."""

from __future__ import annotations

from typing import Sequence

import torch
from mmdet3d.registry import MODELS
from torch import Tensor, nn


@MODELS.register_module()
class ConvFuser(nn.Sequential):
    """``cat([camera, lidar])`` -> Conv2d 3x3 (no bias) -> BN -> ReLU.

    A Sequential so the checkpoint keys are ``fuser.0.weight`` / ``fuser.1.*`` and the
    conv is a plain ``nn.Conv2d`` that a quantizer can replace by path (``fuser.0``).

    Args:
        in_channels: channels of each input, in the order they are passed.
        out_channels: fused channels.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        channels = [int(c) for c in in_channels]
        super().__init__(
            nn.Conv2d(sum(channels), out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(True),
        )
        self.in_channels = channels

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:  # type: ignore[override]
        return super().forward(torch.cat(list(inputs), dim=1))
