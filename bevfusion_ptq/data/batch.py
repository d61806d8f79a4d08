"""The batch dict of the shared contract: collate, move to a device, and a synthetic one.

Keys (B samples, N = 6 cameras):

====================  ==========================  ==========================================
key                   type / shape                meaning
====================  ==========================  ==========================================
img                   float32 [B, N, 3, H, W]     RGB in [0, 1], normalised by ``img_norm``
points                list of B float32 [P_i, 5]  x y z intensity time_lag, lidar frame,
                                                  inside ``point_cloud_range``
camera_intrinsics     float32 [B, N, 4, 4]        K top-left, 1 at [3, 3]
camera2lidar          float32 [B, N, 4, 4]
lidar2camera          float32 [B, N, 4, 4]
lidar2image           float32 [B, N, 4, 4]        intrinsics @ lidar2camera (no image aug)
camera2ego            float32 [B, N, 4, 4]
lidar2ego             float32 [B, 4, 4]
img_aug_matrix        float32 [B, N, 4, 4]        source pixel -> network pixel
lidar_aug_matrix      float32 [B, 4, 4]           identity for ``test``
metas                 list of B dicts             token, scene_token, timestamp (us),
                                                  position, lidar_path, ego2global,
                                                  gt_boxes [K, 7], gt_names, gt_velocity
====================  ==========================  ==========================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bevfusion_ptq.data.augment import deterministic_image_aug
from bevfusion_ptq.data.geometry import invert_rigid
from bevfusion_ptq.data.rig import DEFAULT_CAMERAS, DEFAULT_LIDAR2EGO, NUSCENES_IMAGE_SIZE
from bevfusion_ptq.data.settings import DataSettings

STACKED_KEYS: tuple[str, ...] = (
    "img",
    "camera_intrinsics",
    "camera2lidar",
    "lidar2camera",
    "lidar2image",
    "camera2ego",
    "lidar2ego",
    "img_aug_matrix",
    "lidar_aug_matrix",
)


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack per-sample tensors into the batch dict; points and metas stay per-sample lists."""
    batch: dict[str, Any] = {key: torch.stack([s[key] for s in samples]) for key in STACKED_KEYS}
    batch["points"] = [s["points"] for s in samples]
    batch["metas"] = [dict(s["metas"]) for s in samples]
    return batch


def move_batch(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Tensors and lists of tensors to ``device`` (non-blocking: pinned host memory overlaps
    the copy with compute); everything else (metas) is passed through untouched."""

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            return [v.to(device, non_blocking=True) for v in value]
        return value

    return {key: move(value) for key, value in batch.items()}


def random_batch(
    cfg: Any,
    batch_size: int = 1,
    num_points: int = 20000,
    seed: int = 0,
) -> dict[str, Any]:
    """A synthetic batch with real-looking geometry, for model tests that need no files.

    ``cfg`` is a model config or its ``data`` section. Images are noise, points uniform in the
    point-cloud range; the matrices come from the default nuScenes-like rig with the test image
    transform, so a view transform sees the frustums it would on real data.
    """
    s = DataSettings.from_cfg(cfg)
    gen = torch.Generator().manual_seed(seed)
    h, w = s.image_size
    n = len(DEFAULT_CAMERAS)
    lidar2ego = DEFAULT_LIDAR2EGO
    ego2lidar = invert_rigid(lidar2ego)
    intrinsics, c2l, l2c, l2i, c2e = [], [], [], [], []
    for mount in DEFAULT_CAMERAS:
        k = np.eye(4)
        k[:3, :3] = mount.intrinsics()
        cam2lidar = ego2lidar @ mount.camera2ego()
        lidar2cam = invert_rigid(cam2lidar)
        intrinsics.append(k)
        c2l.append(cam2lidar)
        l2c.append(lidar2cam)
        l2i.append(k @ lidar2cam)
        c2e.append(mount.camera2ego())
    aug = deterministic_image_aug(s, NUSCENES_IMAGE_SIZE).matrix()

    def rep(mats: list[np.ndarray] | np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.asarray(mats, dtype=np.float32))
        return t.unsqueeze(0).expand(batch_size, *t.shape).clone()

    lo = torch.tensor(s.point_cloud_range[:3])
    hi = torch.tensor(s.point_cloud_range[3:])
    points = []
    for _ in range(batch_size):
        xyz = lo + (hi - lo) * torch.rand(num_points, 3, generator=gen)
        intensity = 255.0 * torch.rand(num_points, 1, generator=gen)
        lag = 0.5 * torch.rand(num_points, 1, generator=gen)
        extra = torch.zeros(num_points, max(0, len(s.use_dim) - 5))
        points.append(torch.cat([xyz, intensity, lag, extra], dim=1)[:, : len(s.use_dim)].contiguous())
    return {
        "img": torch.randn(batch_size, n, 3, h, w, generator=gen),
        "points": points,
        "camera_intrinsics": rep(intrinsics),
        "camera2lidar": rep(c2l),
        "lidar2camera": rep(l2c),
        "lidar2image": rep(l2i),
        "camera2ego": rep(c2e),
        "lidar2ego": rep(lidar2ego),
        "img_aug_matrix": rep([aug] * n),
        "lidar_aug_matrix": rep(np.eye(4)),
        "metas": [
            {"token": f"random-{seed}-{i}", "scene_token": "random", "timestamp": 0, "position": i}
            for i in range(batch_size)
        ],
    }
