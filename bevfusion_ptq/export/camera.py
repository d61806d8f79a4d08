"""camera.backbone.onnx and camera.vtransform.onnx: the camera branch cut where the runtime cuts it.

The runtime runs the image encoder and the depth network in TensorRT, then lifts and pools
the frustum itself (CUDA bevpool), then runs the BEV downsample in TensorRT again. So the
backbone graph ends at the depth network's output, split into the depth distribution
(softmax over bins, ``camera_depth_weights`` ``[N, D, fH, fW]``) and the context features in
NHWC (``camera_feature`` ``[N, fH, fW, C]``); the vtransform graph is only the downsample.
:func:`pool_camera_bev` is the pooling in between, in PyTorch, as the runtime computes it.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from bevfusion_ptq.model.bevfusion import _first


class CameraBackboneGraph(nn.Module):
    """``img`` ``[1, N, 3, H, W]``, ``depth`` ``[1, N, 1, H, W]`` -> (camera_feature, camera_depth_weights).

    The depth image goes through ``dtransform`` and is concatenated *before* the image
    features, as :meth:`DepthLSSTransform.get_cam_feats` does.
    """

    input_names = ("img", "depth")
    output_names = ("camera_feature", "camera_depth_weights")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        camera = model.encoders["camera"]
        vtransform = camera["vtransform"]
        self.backbone = camera["backbone"]
        self.neck = camera["neck"]
        self.dtransform = vtransform.dtransform
        self.depthnet = vtransform.depthnet
        self.depth_bins = int(vtransform.depth_bins)
        self.channels = int(vtransform.out_channels)

    def forward(self, img: Tensor, depth: Tensor) -> tuple[Tensor, Tensor]:
        x = _first(self.neck(self.backbone(img.flatten(0, 1))))
        d = self.dtransform(depth.flatten(0, 1))
        x = self.depthnet(torch.cat([d, x], dim=1))
        weights = x[:, : self.depth_bins].softmax(dim=1)
        feature = x[:, self.depth_bins : self.depth_bins + self.channels].permute(0, 2, 3, 1)
        return feature, weights


class VTransformGraph(nn.Module):
    """``feat_in`` (pooled camera BEV ``[1, C, X, Y]``) -> ``feat_out`` (after the BEV downsample)."""

    input_names = ("feat_in",)
    output_names = ("feat_out",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.downsample = model.encoders["camera"]["vtransform"].downsample

    def forward(self, feat_in: Tensor) -> Tensor:
        return self.downsample(feat_in)


def camera_inputs(model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """(img, depth) for the backbone graph: the depth image is rendered from the lidar points
    (the runtime's camera-depth kernel does the same on the GPU)."""
    vtransform = model.encoders["camera"]["vtransform"]
    img = batch["img"].float()
    with torch.no_grad():
        depth = vtransform.depth_image(
            batch["points"], batch["lidar2image"].float(), batch["img_aug_matrix"].float(),
            batch["lidar_aug_matrix"].float(),
        )
    return img, depth


def camera_geometry(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """Metric position of every frustum point ``[1, N, D, fH, fW, 3]`` (the runtime's geometry)."""
    vtransform = model.encoders["camera"]["vtransform"]
    return vtransform.get_geometry(
        batch["camera2lidar"].float(), batch["camera_intrinsics"].float(),
        batch["img_aug_matrix"].float(), batch["lidar_aug_matrix"].float(),
    )


def pool_camera_bev(model: nn.Module, feature: Tensor, depth_weights: Tensor, geometry: Tensor) -> Tensor:
    """BEV pooling between the two camera graphs: outer product of depth weights and NHWC
    features, summed into the BEV grid -> ``feat_in`` ``[1, C, X, Y]``."""
    vtransform = model.encoders["camera"]["vtransform"]
    cams, fh, fw, channels = feature.shape
    feats = depth_weights.unsqueeze(1) * feature.permute(0, 3, 1, 2).unsqueeze(2)  # [N, C, D, fH, fW]
    feats = feats.view(1, cams, channels, depth_weights.shape[1], fh, fw).permute(0, 1, 3, 4, 5, 2)
    return vtransform.splat(geometry, feats)
