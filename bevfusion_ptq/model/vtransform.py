"""Camera-to-BEV view transform (lift, splat) with lidar depth hints: DepthLSSTransform.

Each feature-map pixel is lifted to ``D`` depth bins along its camera ray, weighted by a
predicted depth distribution, and the resulting 3-D points are summed into a BEV grid.
The depth distribution also sees a sparse depth image rendered from the lidar points
(``dtransform``), which is what makes this the "Depth" variant.

Conventions (shared with the lidar branch and the head):

* BEV maps are ``[B, C, X, Y]``: dim -2 indexes x (forward), dim -1 indexes y (left).
* The frustum holds (u, v, depth) with u, v in pixels of the *augmented* image; the image
  augmentation is undone before unprojecting, and the lidar augmentation is applied after,
  so the BEV lives in the augmented lidar frame, like the points.
"""

from __future__ import annotations

from typing import Sequence

import torch
from mmdet3d.registry import MODELS
from mmengine.model import BaseModule
from torch import Tensor, nn

from ..errors import DatasetError
from .bev_pool import bev_pool, fold_height, frustum_to_voxel_coords


def _bounds_to_grid(bounds: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[int]]:
    """(cell size, first cell centre, cell count) per axis from [lower, upper, step] rows."""
    steps = [float(row[2]) for row in bounds]
    centres = [float(row[0]) + float(row[2]) / 2.0 for row in bounds]
    counts = [int(round((float(row[1]) - float(row[0])) / float(row[2]))) for row in bounds]
    return steps, centres, counts


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = True) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias),
        nn.BatchNorm2d(cout),
        nn.ReLU(True),
    ]


@MODELS.register_module()
class DepthLSSTransform(BaseModule):
    """Lift-splat-shoot with a depth-hint branch, then an optional BEV downsample.

    Args:
        in_channels: channels of the camera neck output used (the stride-8 map).
        out_channels: BEV feature channels C (per height slice).
        image_size: (H, W) of the images fed to the backbone.
        feature_size: (fH, fW) of the neck output, normally image_size / 8.
        xbound, ybound, zbound: [lower, upper, step] of the BEV grid in metres.
        dbound: [near, far, step] of the depth bins.
        downsample: 1, or 2 for three 3x3 convs with a stride-2 middle one.
        dtransform_channels: widths of the three convs that encode the depth image; the
            first two strides are 4 and 2 so the output matches the stride-8 features.
        depthnet_channels: width of depthnet's two hidden 3x3 convs (default in_channels).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: Sequence[int],
        feature_size: Sequence[int],
        xbound: Sequence[float],
        ybound: Sequence[float],
        zbound: Sequence[float],
        dbound: Sequence[float],
        downsample: int = 1,
        dtransform_channels: Sequence[int] = (8, 32, 64),
        depthnet_channels: int | None = None,
        init_cfg: dict | list | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.image_size = tuple(int(v) for v in image_size)
        self.feature_size = tuple(int(v) for v in feature_size)
        self.dbound = tuple(float(v) for v in dbound)
        steps, centres, counts = _bounds_to_grid([xbound, ybound, zbound])
        # Non-trainable Parameters (not buffers) because the reference checkpoint stores
        # them under these names; a strict load needs them in the state dict.
        self.dx = nn.Parameter(torch.tensor(steps), requires_grad=False)
        self.bx = nn.Parameter(torch.tensor(centres), requires_grad=False)
        self.nx = nn.Parameter(torch.tensor(counts, dtype=torch.long), requires_grad=False)
        self.frustum = nn.Parameter(self._create_frustum(), requires_grad=False)
        self.depth_bins = self.frustum.shape[0]

        c1, c2, c3 = (int(v) for v in dtransform_channels)
        self.dtransform = nn.Sequential(
            *_conv_bn_relu(1, c1, 1),
            *_conv_bn_relu(c1, c2, 5, stride=4),
            *_conv_bn_relu(c2, c3, 5, stride=2),
        )
        mid = in_channels if depthnet_channels is None else int(depthnet_channels)
        self.depthnet = nn.Sequential(
            *_conv_bn_relu(in_channels + c3, mid, 3),
            *_conv_bn_relu(mid, mid, 3),
            nn.Conv2d(mid, self.depth_bins + out_channels, 1),
        )
        if downsample > 1:
            if downsample != 2:
                raise ValueError(f"DepthLSSTransform supports downsample 1 or 2, got {downsample}")
            self.downsample = nn.Sequential(
                *_conv_bn_relu(out_channels, out_channels, 3, bias=False),
                *_conv_bn_relu(out_channels, out_channels, 3, stride=2, bias=False),
                *_conv_bn_relu(out_channels, out_channels, 3, bias=False),
            )
        else:
            self.downsample = nn.Identity()

    def _create_frustum(self) -> Tensor:
        """``[D, fH, fW, 3]`` of (u pixel, v pixel, depth) for every lifted point."""
        ih, iw = self.image_size
        fh, fw = self.feature_size
        depths = torch.arange(*self.dbound, dtype=torch.float32)
        num_d = depths.shape[0]
        ds = depths.view(-1, 1, 1).expand(num_d, fh, fw)
        xs = torch.linspace(0, iw - 1, fw, dtype=torch.float32).view(1, 1, fw).expand(num_d, fh, fw)
        ys = torch.linspace(0, ih - 1, fh, dtype=torch.float32).view(1, fh, 1).expand(num_d, fh, fw)
        return torch.stack((xs, ys, ds), dim=-1)

    # ----------------------------------------------------------------- geometry
    def get_geometry(
        self,
        camera2lidar: Tensor,
        camera_intrinsics: Tensor,
        img_aug_matrix: Tensor,
        lidar_aug_matrix: Tensor,
    ) -> Tensor:
        """Metric (x, y, z) in the augmented lidar frame of every frustum point.

        Args:
            camera2lidar, camera_intrinsics, img_aug_matrix: ``[B, N, 4, 4]``.
            lidar_aug_matrix: ``[B, 4, 4]``.

        Returns:
            ``[B, N, D, fH, fW, 3]``.
        """
        batch, cams = camera2lidar.shape[:2]
        post_rots = img_aug_matrix[..., :3, :3]
        post_trans = img_aug_matrix[..., :3, 3]
        view = (batch, cams, 1, 1, 1)
        # undo the image augmentation: pixels of the augmented image -> original pixels
        points = self.frustum.to(camera2lidar.dtype) - post_trans.view(*view, 3)
        points = torch.inverse(post_rots).view(*view, 3, 3).matmul(points.unsqueeze(-1))
        # (u, v, d) -> (u*d, v*d, d), then camera -> lidar
        points = torch.cat((points[..., :2, :] * points[..., 2:3, :], points[..., 2:3, :]), dim=-2)
        combine = camera2lidar[..., :3, :3].matmul(torch.inverse(camera_intrinsics[..., :3, :3]))
        points = combine.view(*view, 3, 3).matmul(points).squeeze(-1)
        points = points + camera2lidar[..., :3, 3].view(*view, 3)
        # apply the lidar (global) augmentation
        extra_rots = lidar_aug_matrix[:, :3, :3].view(batch, 1, 1, 1, 1, 3, 3)
        points = extra_rots.matmul(points.unsqueeze(-1)).squeeze(-1)
        return points + lidar_aug_matrix[:, :3, 3].view(batch, 1, 1, 1, 1, 3)

    def depth_image(
        self,
        points: Sequence[Tensor],
        lidar2image: Tensor,
        img_aug_matrix: Tensor,
        lidar_aug_matrix: Tensor,
    ) -> Tensor:
        """Sparse depth image ``[B, N, 1, H, W]`` rendered from the lidar points.

        Points are taken back to the un-augmented lidar frame, projected with
        ``lidar2image``, then moved by the image augmentation. Pixels without a point stay
        0; points behind a camera are skipped. Where several points land on one pixel the
        nearest wins. The reference writes them with an indexed assignment, whose winner is
        whichever write lands last (it varies between runs on multi-threaded CPUs and on
        GPUs); the nearest point is what a depth image shows, and makes calibration
        reproducible.
        """
        batch, cams = lidar2image.shape[:2]
        ih, iw = self.image_size
        ref = lidar2image
        depth = ref.new_zeros((batch, cams, 1, ih, iw))
        for b in range(batch):
            xyz = points[b][:, :3].to(ref.dtype)
            xyz = xyz - lidar_aug_matrix[b, :3, 3]
            xyz = torch.inverse(lidar_aug_matrix[b, :3, :3]).matmul(xyz.transpose(1, 0))  # [3, P]
            cam = lidar2image[b, :, :3, :3].matmul(xyz) + lidar2image[b, :, :3, 3].unsqueeze(-1)
            dist = cam[:, 2, :]  # [N, P]
            uv = cam[:, :2, :] / torch.clamp(cam[:, 2:3, :], 1e-5, 1e5)
            uvz = torch.cat((uv, torch.ones_like(dist).unsqueeze(1)), dim=1)
            uvz = img_aug_matrix[b, :, :3, :3].matmul(uvz) + img_aug_matrix[b, :, :3, 3].unsqueeze(-1)
            u, v = uvz[:, 0, :], uvz[:, 1, :]
            on_img = (dist > 0) & (u >= 0) & (u < iw) & (v >= 0) & (v < ih)
            cam_idx, pt_idx = on_img.nonzero(as_tuple=True)
            pixel = (cam_idx * ih + v[cam_idx, pt_idx].long()) * iw + u[cam_idx, pt_idx].long()
            nearest = torch.full((cams * ih * iw,), float("inf"), dtype=ref.dtype, device=ref.device)
            nearest.scatter_reduce_(0, pixel, dist[cam_idx, pt_idx], reduce="amin")
            depth[b, :, 0] = torch.where(torch.isinf(nearest), 0.0, nearest).view(cams, ih, iw)
        return depth

    # ----------------------------------------------------------------- lift & splat
    def get_cam_feats(self, img_feats: Tensor, depth: Tensor) -> Tensor:
        """Depth-weighted features ``[B, N, D, fH, fW, C]`` (outer product of the two)."""
        batch, cams, channels, fh, fw = img_feats.shape
        x = img_feats.view(batch * cams, channels, fh, fw)
        d = self.dtransform(depth.view(batch * cams, *depth.shape[2:]))
        x = self.depthnet(torch.cat([d, x], dim=1))
        probs = x[:, : self.depth_bins].softmax(dim=1)
        feats = probs.unsqueeze(1) * x[:, self.depth_bins : self.depth_bins + self.out_channels].unsqueeze(2)
        feats = feats.view(batch, cams, self.out_channels, self.depth_bins, fh, fw)
        return feats.permute(0, 1, 3, 4, 5, 2)

    def splat(self, geom: Tensor, feats: Tensor) -> Tensor:
        """Sum lifted features into the grid: ``[B, Z*C, X, Y]`` before any downsample."""
        batch = feats.shape[0]
        channels = feats.shape[-1]
        lower = (self.bx - self.dx / 2.0).to(geom.dtype)
        coords = frustum_to_voxel_coords(geom, lower, self.dx.to(geom.dtype)).view(-1, 3)
        per_sample = coords.shape[0] // batch
        batch_ix = torch.arange(batch, device=coords.device).repeat_interleave(per_sample)
        coords = torch.cat((batch_ix.unsqueeze(1), coords), dim=1)
        grid = [int(v) for v in self.nx.tolist()]
        pooled = bev_pool(feats.reshape(-1, channels), coords, batch, grid)
        return fold_height(pooled)

    def forward(
        self,
        img_feats: Tensor,
        points: Sequence[Tensor],
        camera2lidar: Tensor,
        camera_intrinsics: Tensor,
        img_aug_matrix: Tensor,
        lidar_aug_matrix: Tensor,
        lidar2image: Tensor,
    ) -> Tensor:
        """Camera BEV ``[B, C, X', Y']`` (X', Y' after the downsample)."""
        if tuple(img_feats.shape[-2:]) != self.feature_size:
            raise DatasetError(
                f"camera features are {tuple(img_feats.shape[-2:])} but the config's "
                f"vtransform.feature_size is {self.feature_size}: the batch images do not "
                f"match data.image_size {self.image_size}"
            )
        # Geometry stays float32 under autocast: half precision would move points by
        # several centimetres at 50 m and shift them across cell borders.
        with torch.autocast(device_type=img_feats.device.type, enabled=False):
            geom = self.get_geometry(
                camera2lidar.float(), camera_intrinsics.float(), img_aug_matrix.float(), lidar_aug_matrix.float()
            )
            depth = self.depth_image(points, lidar2image.float(), img_aug_matrix.float(), lidar_aug_matrix.float())
        feats = self.get_cam_feats(img_feats, depth.to(img_feats.dtype))
        bev = self.splat(geom, feats)
        return self.downsample(bev)
