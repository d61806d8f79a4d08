"""Turn one :class:`SampleRecord` into one sample of the batch contract (unbatched).

Two pipelines: ``test`` (deterministic; our default, because calibration data that changes
from run to run makes amax values that cannot be reproduced) and ``train-aug`` (the
reference's augmentations, seeded per sample so a run is still reproducible). The steps and
ranges are documented in :mod:`bevfusion_ptq.data.augment` and :mod:`bevfusion_ptq.data.loading`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bevfusion_ptq.data.augment import augment_boxes, deterministic_image_aug, random_image_aug, random_lidar_aug
from bevfusion_ptq.data.infos import SampleRecord
from bevfusion_ptq.data.loading import filter_range, load_image, load_lidar
from bevfusion_ptq.data.settings import DataSettings, check_pipeline


def camera_matrices(record: SampleRecord) -> dict[str, np.ndarray]:
    """The per-camera geometry of the batch contract, ``[N, 4, 4]`` each, plus ``lidar2ego``."""
    intrinsics, camera2lidar, lidar2camera, lidar2image, camera2ego = [], [], [], [], []
    for cam in record.cameras:
        k = np.eye(4)
        k[:3, :3] = cam.intrinsics
        c2l = cam.camera2lidar
        l2c = np.eye(4)
        l2c[:3, :3] = c2l[:3, :3].T
        l2c[:3, 3] = -c2l[:3, :3].T @ c2l[:3, 3]
        intrinsics.append(k)
        camera2lidar.append(c2l)
        lidar2camera.append(l2c)
        lidar2image.append(k @ l2c)
        camera2ego.append(cam.camera2ego)
    f32 = np.float32
    return {
        "camera_intrinsics": np.stack(intrinsics).astype(f32),
        "camera2lidar": np.stack(camera2lidar).astype(f32),
        "lidar2camera": np.stack(lidar2camera).astype(f32),
        "lidar2image": np.stack(lidar2image).astype(f32),
        "camera2ego": np.stack(camera2ego).astype(f32),
        "lidar2ego": record.lidar2ego.astype(f32),
    }


@dataclass(frozen=True)
class SamplePipeline:
    """Load and transform one keyframe; ``seed`` only matters for ``train-aug``."""

    settings: DataSettings
    name: str = "test"
    seed: int = 0

    def __post_init__(self) -> None:
        check_pipeline(self.name)

    def __call__(self, record: SampleRecord, position: int = 0) -> dict[str, Any]:
        """Sample ``position`` of a calibration set: its random draws depend on (seed, position)
        only, never on which loader worker runs it."""
        s = self.settings
        rng = np.random.default_rng([self.seed, position]) if self.name == "train-aug" else None

        images, aug_matrices = [], []
        for cam in record.cameras:
            image = load_image(cam.image_path, record.source_image_size, f"image {cam.name} of sample {record.token}")
            aug = (
                deterministic_image_aug(s, record.source_image_size)
                if rng is None
                else random_image_aug(s, record.source_image_size, rng)
            )
            images.append(np.asarray(aug.apply(image), dtype=np.uint8))
            aug_matrices.append(aug.matrix())

        points = load_lidar(record, s.sweeps_num, s.load_dim, rng)
        lidar_aug = np.eye(4) if rng is None else random_lidar_aug(s, rng)
        boxes, velocity = record.gt_boxes, record.gt_velocity
        if rng is not None:
            points[:, :3] = points[:, :3] @ lidar_aug[:3, :3].T.astype(np.float32) + lidar_aug[:3, 3].astype(np.float32)
            boxes, velocity = augment_boxes(boxes, velocity, lidar_aug)
        points = filter_range(points, s.point_cloud_range)[:, list(s.use_dim)]

        # (x / 255 - mean) / std as one multiply-add; permuting the uint8 array first makes
        # the float conversion a contiguous pass (3x faster than normalising a strided view).
        std = torch.tensor(s.img_std).view(1, 3, 1, 1)
        scale = 1.0 / (255.0 * std)
        bias = -torch.tensor(s.img_mean).view(1, 3, 1, 1) / std
        img = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().float().mul_(scale).add_(bias)

        sample: dict[str, Any] = {
            "img": img,
            "points": torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)),
        }
        for key, value in camera_matrices(record).items():
            sample[key] = torch.from_numpy(value)
        sample["img_aug_matrix"] = torch.from_numpy(np.stack(aug_matrices).astype(np.float32))
        sample["lidar_aug_matrix"] = torch.from_numpy(lidar_aug.astype(np.float32))
        sample["metas"] = {
            "token": record.token,
            "scene_token": record.scene,
            "timestamp": record.timestamp_us,
            "position": position,
            "lidar_path": str(record.lidar_path),
            "ego2global": record.ego2global.astype(np.float32),
            "gt_boxes": boxes,  # internal boxes [K, 7] in the (augmented) lidar frame
            "gt_names": list(record.gt_names),
            "gt_velocity": velocity,
        }
        return sample
