"""Synthetic batches with plausible geometry for model tests (no dataset needed).

Six cameras on a ring look outward (yaw 0, 60, ..., 300 degrees, camera 0 along +x), with
nuScenes-like intrinsics for a 900x1600 source image, resized by ``data.test_resize`` and
cropped to ``data.image_size`` like the reference test pipeline. Points are random inside
the point-cloud range.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch

SOURCE_HW = (900, 1600)
FOCAL = 1260.0


def camera_rig(yaws_deg: Sequence[float], height: float = 1.6) -> tuple[torch.Tensor, torch.Tensor]:
    """camera2lidar ``[N, 4, 4]`` and 4x4 intrinsics ``[N, 4, 4]`` of outward cameras.

    Camera axes: z forward, x right, y down. A camera with yaw t looks along
    (cos t, sin t, 0) in the lidar frame (x forward, y left, z up).
    """
    c2l = []
    for yaw in yaws_deg:
        t = math.radians(yaw)
        forward = torch.tensor([math.cos(t), math.sin(t), 0.0])
        right = torch.tensor([math.sin(t), -math.cos(t), 0.0])
        down = torch.tensor([0.0, 0.0, -1.0])
        m = torch.eye(4)
        m[:3, 0], m[:3, 1], m[:3, 2] = right, down, forward
        m[:3, 3] = torch.tensor([0.0, 0.0, height])
        c2l.append(m)
    k = torch.eye(4)
    k[0, 0] = k[1, 1] = FOCAL
    k[0, 2], k[1, 2] = SOURCE_HW[1] / 2.0, SOURCE_HW[0] / 2.0
    return torch.stack(c2l), k.expand(len(yaws_deg), 4, 4).clone()


def reference_img_aug(image_size: Sequence[int], resize: float) -> torch.Tensor:
    """Resize then crop (bottom rows, centred columns) as a 4x4 pixel transform."""
    h, w = image_size
    new_h, new_w = int(SOURCE_HW[0] * resize), int(SOURCE_HW[1] * resize)
    crop_top, crop_left = new_h - h, (new_w - w) // 2
    m = torch.eye(4)
    m[0, 0] = m[1, 1] = resize
    m[0, 3], m[1, 3] = -crop_left, -crop_top
    return m


def synthetic_batch(
    cfg: Any,
    batch_size: int = 1,
    num_points: int = 4000,
    seed: int = 0,
    yaws_deg: Sequence[float] = (0, 60, 120, 180, 240, 300),
    points: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """A batch in the shared batch format for ``cfg`` (a loaded config)."""
    gen = torch.Generator().manual_seed(seed)
    data = cfg.data
    h, w = data.image_size
    cams = len(yaws_deg)
    c2l, intr = camera_rig(yaws_deg)
    l2c = torch.inverse(c2l)
    l2i = intr @ l2c
    aug = reference_img_aug((h, w), data.test_resize).expand(cams, 4, 4)
    if points is None:
        lo = torch.tensor(data.point_cloud_range[:3])
        hi = torch.tensor(data.point_cloud_range[3:])
        points = []
        for _ in range(batch_size):
            xyz = lo + (hi - lo) * torch.rand(num_points, 3, generator=gen) * 0.999
            extra = torch.rand(num_points, 2, generator=gen)
            points.append(torch.cat([xyz, extra], dim=1))
    rep = lambda t: t.unsqueeze(0).expand(batch_size, *t.shape).clone()  # noqa: E731
    return {
        "img": torch.randn(batch_size, cams, 3, h, w, generator=gen),
        "points": list(points),
        "camera_intrinsics": rep(intr),
        "camera2lidar": rep(c2l),
        "lidar2camera": rep(l2c),
        "lidar2image": rep(l2i),
        "camera2ego": rep(c2l),
        "lidar2ego": rep(torch.eye(4)),
        "img_aug_matrix": rep(aug),
        "lidar_aug_matrix": rep(torch.eye(4)),
        "metas": [
            {"token": f"synthetic-{seed}-{b}", "scene_token": "synthetic", "timestamp": 0}
            for b in range(batch_size)
        ],
    }


class UntrustedMeta:
    """A class that safe (weights-only) unpickling refuses: stands in for pickled objects."""

    def __init__(self, note: str = "x") -> None:
        self.note = note


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore.

    spconv's CPU gather/scatter and torch.mm slow down ~10x when their threads compete
    with other processes for 2 cores (spin-waiting); one thread keeps the CPU tests'
    time predictable on a shared machine.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
