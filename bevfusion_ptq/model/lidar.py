"""Lidar encoder parts: hard voxelization with mean features, and the sparse encoder.

Axis order is the one decision that matters here. The reference works in (x, y, z):
sparse shape [1440, 1440, 41], downsample padding (1, 1, 0) and the output conv's kernel
(1, 1, 3) / stride (1, 1, 2) all list x, y, z, and its trained kernels are laid out that
way. mmdet3d 1.x writes both the sparse shape and the voxel coordinates z, y, x. Rather
than reorder the reference's trained kernels, the voxel coordinates are flipped once, in
:class:`HardVoxelize`, from mmcv's (z, y, x) to (x, y, z); everything downstream
(the sparse encoder, its dense output, the BEV layout) stays in the reference order.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from mmcv.ops import voxelization
from mmdet3d.models.layers import make_sparse_convmodule
from mmdet3d.models.layers.spconv import IS_SPCONV2_AVAILABLE
from mmdet3d.models.middle_encoders import SparseEncoder
from mmdet3d.registry import MODELS
from torch import Tensor, nn

from ..sparse_cpu import sparse_convs_on
from .voxelize import hard_voxelize, mean_features

if IS_SPCONV2_AVAILABLE:
    from spconv.pytorch import SparseConvTensor
else:  # pragma: no cover - mmcv's spconv 1.x port, CUDA only
    from mmcv.ops import SparseConvTensor

VOXEL_BACKENDS = ("auto", "mmcv", "torch")


@MODELS.register_module()
class HardVoxelize(nn.Module):
    """Hard voxelization (at most ``max_num_points`` per voxel), features averaged.

    Two implementations of one rule (:mod:`bevfusion_ptq.model.voxelize` states it):
    mmcv's compiled ``voxelization`` op, the reference's, and the same rule in torch ops
    (``torch``), which runs on any device. ``backend="auto"`` takes mmcv on the CPU and
    torch on CUDA: mmcv's CUDA ops depend on how mmcv was built, and probing that
    (``mmcv.ops.get_compiling_cuda_version``) crashed the process on the H200 with mmcv
    2.1.0 built against CUDA 13. Both give the same voxels, in the same order, with the
    same points and the same mean features (tests compare them bit for bit, over the
    voxel cap too). Holds no parameters, so it adds no state-dict keys.

    Args:
        voxel_size: (x, y, z) voxel size in metres.
        point_cloud_range: (x_min, y_min, z_min, x_max, y_max, z_max).
        max_num_points: points kept per voxel.
        max_voxels: (train, test) voxel budgets; eval mode uses the second.
        deterministic: kept for config compatibility; both backends are deterministic.
        backend: ``auto``, ``mmcv`` or ``torch``.
    """

    def __init__(
        self,
        voxel_size: Sequence[float],
        point_cloud_range: Sequence[float],
        max_num_points: int = 10,
        max_voxels: Sequence[int] | int = (120000, 160000),
        deterministic: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if backend not in VOXEL_BACKENDS:
            raise ValueError(f"voxelization backend {backend!r} is not one of {VOXEL_BACKENDS}")
        self.backend = backend
        self.voxel_size = [float(v) for v in voxel_size]
        self.point_cloud_range = [float(v) for v in point_cloud_range]
        self.max_num_points = int(max_num_points)
        if isinstance(max_voxels, int):
            max_voxels = (max_voxels, max_voxels)
        self.max_voxels = tuple(int(v) for v in max_voxels)
        self.deterministic = deterministic
        extent = [hi - lo for lo, hi in zip(self.point_cloud_range[:3], self.point_cloud_range[3:])]
        self.grid_size = [int(round(e / v)) for e, v in zip(extent, self.voxel_size)]

    def backend_for(self, device: torch.device) -> str:
        """The backend that will voxelize points on ``device``."""
        if self.backend != "auto":
            return self.backend
        return "mmcv" if device.type == "cpu" else "torch"

    def _voxelize(self, pts: Tensor, budget: int) -> tuple[Tensor, Tensor, Tensor]:
        """(voxels [M, max_points, C], coords [M, 3] as (z, y, x), counts [M]) of one cloud."""
        if self.backend_for(pts.device) == "mmcv":
            return voxelization(
                pts, self.voxel_size, self.point_cloud_range, self.max_num_points, budget, self.deterministic
            )
        return hard_voxelize(pts, self.voxel_size, self.point_cloud_range, self.grid_size, self.max_num_points, budget)

    def forward(self, points: Sequence[Tensor]) -> tuple[Tensor, Tensor, int]:
        """Voxelize every sample of the batch.

        Returns:
            features ``[M, C]`` (mean of the voxel's points), coordinates ``[M, 4]`` int32
            as (batch, ix, iy, iz), and the batch size.
        """
        budget = self.max_voxels[0] if self.training else self.max_voxels[1]
        feats, coords = [], []
        for b, pts in enumerate(points):
            voxels, coors, counts = self._voxelize(pts.contiguous(), budget)
            feats.append(mean_features(voxels, counts))
            # both backends write (z, y, x); flip to the reference's (x, y, z), then prepend batch.
            coords.append(F.pad(coors.flip(-1), (1, 0), mode="constant", value=b))
        return torch.cat(feats, dim=0), torch.cat(coords, dim=0), len(points)


@MODELS.register_module()
class BEVSparseEncoder(SparseEncoder):
    """mmdet3d ``SparseEncoder`` working in (x, y, z) order, giving a ``[B, C*Z, X, Y]`` BEV.

    Two differences from the parent, both forced by the reference's axis order:

    * ``conv_out`` uses ``conv_out_kernel`` / ``conv_out_stride`` (reference: (1, 1, 3) /
      (1, 1, 2), i.e. along z), where the parent hard-codes (3, 1, 1) / (2, 1, 1) for z
      first.
    * ``forward`` folds the last (z) axis of the dense output into the channels,
      channel-major (``c * Z + z``), and keeps (x, y) as the two BEV axes.

    ``sparse_shape`` and ``encoder_paddings`` are given in (x, y, z), as in the reference;
    the input coordinates must be (batch, ix, iy, iz), which :class:`HardVoxelize` yields.
    Block and layer names are the parent's, so quantization rules written against
    ``encoder_layers.encoder_layerN.M`` and ``SparseBasicBlock`` apply unchanged.
    """

    def __init__(
        self,
        in_channels: int,
        sparse_shape: Sequence[int],
        conv_out_kernel: Sequence[int] = (1, 1, 3),
        conv_out_stride: Sequence[int] = (1, 1, 2),
        norm_cfg: dict | None = None,
        **kwargs,
    ) -> None:
        norm_cfg = dict(type="BN1d", eps=1e-3, momentum=0.01) if norm_cfg is None else norm_cfg
        if "order" in kwargs:  # the parent insists on a tuple; configs may hold a list
            kwargs["order"] = tuple(kwargs["order"])
        super().__init__(in_channels, list(sparse_shape), norm_cfg=norm_cfg, **kwargs)
        last_channels = tuple(self.encoder_channels[-1])[-1]
        # Replacing the attribute keeps its place in the module order (after encoder_layers).
        self.conv_out = make_sparse_convmodule(
            last_channels,
            self.output_channels,
            kernel_size=tuple(conv_out_kernel),
            stride=tuple(conv_out_stride),
            norm_cfg=norm_cfg,
            padding=0,
            indice_key="spconv_down2",
            conv_type="SparseConv3d",
        )

    def forward(self, voxel_features: Tensor, coors: Tensor, batch_size: int) -> Tensor:
        """Sparse features at (batch, ix, iy, iz) -> dense BEV ``[B, C*Z', X', Y']``."""
        x = SparseConvTensor(voxel_features, coors.int(), list(self.sparse_shape), batch_size)
        with sparse_convs_on(self, voxel_features.device):  # spconv's CPU path needs care
            x = self.conv_input(x)
            for encoder_layer in self.encoder_layers:
                x = encoder_layer(x)
            dense = self.conv_out(x).dense()  # [B, C, X, Y, Z]
        batch, channels, nx, ny, nz = dense.shape
        return dense.permute(0, 1, 4, 2, 3).reshape(batch, channels * nz, nx, ny)
