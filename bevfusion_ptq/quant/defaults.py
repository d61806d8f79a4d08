"""Defaults of the quantization rules that the parameters need, without importing the rules.

:mod:`bevfusion_ptq.params` (and so every ``--help``) needs the default exclusion list;
:mod:`.rules` imports torch, mmdet, mmdet3d and spconv, seconds of start-up for one tuple.
"""

from __future__ import annotations

# The reference disables these after calibration: the raw voxel features entering the lidar
# backbone, and the 1x1 conv of the first decoder deblock.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "encoders.lidar.backbone.conv_input.0",
    "decoder.neck.deblocks.0.0",
)
