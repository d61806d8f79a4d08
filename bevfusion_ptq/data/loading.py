"""File readers: lidar ``.pcd.bin`` files, multi-sweep merging, camera JPEGs.

Why not mmdet3d's ``LoadPointsFromFile`` / ``LoadPointsFromMultiSweeps``: in mmdet3d 1.4 the
sweep loader expects 1.x infos (timestamps in seconds, a ``lidar2sensor`` matrix) and applies
that matrix's translation in the wrong order (open-mmlab/mmdetection3d#3054, fix PR #3007 not
merged); BEVFusion's own loader, which the reference calibrated with, uses
``points @ R.T + t`` with the info's ``sensor2lidar_*`` and microsecond timestamps. Wrapping
``LoadPointsFromFile`` would add mmdet3d's import (numba, its registries) to every loader
worker to save one ``np.fromfile``, and its failures (a reshape ``ValueError``) would not name
the file. So the readers here are small and numpy-only, and reproduce BEVFusion's behaviour:

- the keyframe's 5th column (the ring index in nuScenes files) becomes the time lag, 0;
- each sweep is read, points within 1 m of its sensor in x and y removed (the car's roof),
  moved into the keyframe's lidar frame, and given time lag = keyframe time - sweep time in
  seconds;
- ``test``: the newest ``sweeps_num`` sweeps; ``train-aug``: ``sweeps_num`` drawn at random
  without replacement when more are available; a keyframe with no sweeps (first of a scene)
  repeats its own points ``sweeps_num`` times (BEVFusion's ``pad_empty_sweeps``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from bevfusion_ptq.data.infos import SampleRecord
from bevfusion_ptq.errors import DatasetError

log = logging.getLogger(__name__)

CLOSE_RADIUS_M = 1.0


def load_points(path: Path, load_dim: int, what: str = "lidar file") -> np.ndarray:
    """Read a float32 ``.pcd.bin`` as ``[P, load_dim]``; reject truncated files and NaNs."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise DatasetError(f"{what} not found: {path}") from None
    row_bytes = 4 * load_dim
    if size % row_bytes:
        raise DatasetError(
            f"{what} {path} is truncated or not {load_dim} float32 values a point: "
            f"{size} bytes is not a multiple of {row_bytes}"
        )
    points = np.fromfile(path, dtype=np.float32).reshape(-1, load_dim)
    bad = ~np.isfinite(points)
    if bad.any():
        columns = sorted({int(c) for c in np.nonzero(bad)[1]})
        raise DatasetError(
            f"{what} {path} has {int(bad.sum())} non-finite point values (columns {columns}); "
            "refusing to calibrate on it"
        )
    return points


def _remove_close(points: np.ndarray, radius: float = CLOSE_RADIUS_M) -> np.ndarray:
    close = (np.abs(points[:, 0]) < radius) & (np.abs(points[:, 1]) < radius)
    return points[~close]


def load_lidar(record: SampleRecord, sweeps_num: int, load_dim: int, rng: np.random.Generator | None) -> np.ndarray:
    """Keyframe plus sweeps as ``[P, load_dim]`` float32 in the keyframe's lidar frame.

    ``rng`` None picks the newest sweeps (test pipeline); a generator draws them at random.
    """
    key = load_points(record.lidar_path, load_dim, f"lidar file of sample {record.token}")
    key = key.copy()
    key[:, 4] = 0.0
    parts = [key]
    if sweeps_num > 0:
        if not record.sweeps:
            close_removed = _remove_close(key)
            parts += [close_removed] * sweeps_num
        else:
            count = len(record.sweeps)
            if count <= sweeps_num:
                chosen = range(count)
            elif rng is None:
                chosen = range(sweeps_num)
            else:
                chosen = sorted(rng.choice(count, sweeps_num, replace=False).tolist())
            for i in chosen:
                sweep = record.sweeps[i]
                pts = _remove_close(load_points(sweep.path, load_dim, f"sweep {i} of sample {record.token}"))
                pts = pts.copy()
                rot = sweep.sensor2lidar[:3, :3].astype(np.float32)
                pts[:, :3] = pts[:, :3] @ rot.T + sweep.sensor2lidar[:3, 3].astype(np.float32)
                pts[:, 4] = (record.timestamp_us - sweep.timestamp_us) / 1e6
                parts.append(pts)
    return np.concatenate(parts, axis=0)


def filter_range(points: np.ndarray, point_cloud_range: tuple[float, ...]) -> np.ndarray:
    """Keep points strictly inside the range, as mmdet3d's ``PointsRangeFilter`` does."""
    x0, y0, z0, x1, y1, z1 = point_cloud_range
    xyz = points[:, :3]
    keep = (
        (xyz[:, 0] > x0) & (xyz[:, 1] > y0) & (xyz[:, 2] > z0) & (xyz[:, 0] < x1) & (xyz[:, 1] < y1) & (xyz[:, 2] < z1)
    )
    return points[keep]


def load_image(path: Path, expected_hw: tuple[int, int], what: str = "image") -> Image.Image:
    """Open a camera image as RGB at the size its intrinsics refer to.

    A differently-sized image is resized to ``expected_hw`` with a warning: the intrinsics
    then still hold if the image was a uniformly scaled copy (a common way to save disk), and a
    user gets told when it was not.
    """
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DatasetError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise DatasetError(f"{what} {path} cannot be decoded ({exc})") from None
    if image.mode != "RGB":
        image = image.convert("RGB")
    h, w = expected_hw
    if image.size != (w, h):
        log.warning(
            "%s %s is %dx%d, expected %dx%d: resizing it; intrinsics assume the expected size",
            what,
            path,
            image.size[0],
            image.size[1],
            w,
            h,
        )
        image = image.resize((w, h), Image.BICUBIC)
    return image
