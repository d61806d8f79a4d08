"""Hard voxelization in plain torch ops, with mmcv's exact rule, on any device.

Why it exists: the lidar activations depend on which voxels survive the voxel cap, in which
order they are listed, and which points a full voxel keeps. A 10-sweep cloud at r50 sizes
can approach the 160 000-voxel cap, so these choices are not academic. mmcv's hard
voxelizer (the reference's, CPU and deterministic CUDA alike) decides them by walking the
points in file order:

* a point's cell is ``floor((p - range_min) / voxel_size)`` per axis, in float32; points
  with a cell outside ``[0, grid)`` are skipped;
* a cell becomes a voxel at its first point, while fewer than ``max_voxels`` voxels exist;
  voxels are numbered in that order (first appearance);
* a voxel keeps its first ``max_points`` points, in file order.

A hash-table voxelizer (spconv's ``PointToVoxel`` on CUDA) numbers voxels in another order
and fills full voxels in whatever order its atomics land. This module reproduces mmcv's
rule with sorts and scatters that give the same answer on every device, so calibration on
CUDA sees the voxels the CPU path (and the reference) produces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def voxel_cells(points: Tensor, voxel_size: Sequence[float], range_min: Sequence[float]) -> Tensor:
    """``[N, 3]`` int64 cell (x, y, z) of each point: float32 ``floor((p - min) / size)``,
    the arithmetic mmcv's kernels do."""
    xyz = points[:, :3].float()
    lower = xyz.new_tensor([float(v) for v in range_min[:3]])
    size = xyz.new_tensor([float(v) for v in voxel_size])
    return torch.floor((xyz - lower) / size).long()


def hard_voxelize(
    points: Tensor,
    voxel_size: Sequence[float],
    point_cloud_range: Sequence[float],
    grid_size: Sequence[int],
    max_points: int,
    max_voxels: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Voxels of one cloud, exactly as mmcv's ``voxelization`` returns them.

    Args:
        points: ``[N, C]`` float points, x y z first, in file order.
        voxel_size: (x, y, z) voxel size.
        point_cloud_range: (x_min, y_min, z_min, x_max, y_max, z_max).
        grid_size: (nx, ny, nz) cells.
        max_points: points kept per voxel (the first ones).
        max_voxels: voxels kept (the first to appear).

    Returns:
        voxels ``[M, max_points, C]`` (zeros past each voxel's count), coordinates ``[M, 3]``
        int32 as (z, y, x), and point counts ``[M]`` int32, voxels in first-appearance order.
    """
    device = points.device
    nx, ny, nz = (int(v) for v in grid_size)
    cells = voxel_cells(points, voxel_size, point_cloud_range)
    grid = torch.tensor([nx, ny, nz], device=device)
    inside = ((cells >= 0) & (cells < grid)).all(dim=1)
    order = inside.nonzero().squeeze(1)  # point indices in file order
    cells = cells[order]
    linear = (cells[:, 0] * ny + cells[:, 1]) * nz + cells[:, 2]

    unique, voxel_of_point = torch.unique(linear, return_inverse=True)
    first_seen = torch.full((unique.numel(),), order.numel(), dtype=torch.long, device=device)
    first_seen.scatter_reduce_(0, voxel_of_point, torch.arange(order.numel(), device=device), reduce="amin")
    by_appearance = torch.argsort(first_seen)[:max_voxels]  # unique slots, numbered in appearance order
    number = torch.full((unique.numel(),), -1, dtype=torch.long, device=device)
    number[by_appearance] = torch.arange(by_appearance.numel(), device=device)
    voxel = number[voxel_of_point]  # -1 for the points of voxels past the cap

    kept = voxel >= 0
    voxel, source = voxel[kept], order[kept]
    # Rank of each point within its voxel, in file order: a stable sort keeps file order.
    voxel, perm = torch.sort(voxel, stable=True)
    source = source[perm]
    total = by_appearance.numel()
    counts = torch.bincount(voxel, minlength=total)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(voxel.numel(), device=device) - starts[voxel]
    fits = slot < max_points

    voxels = points.new_zeros((total, max_points, points.shape[1]))
    voxels[voxel[fits], slot[fits]] = points[source[fits]]
    lin = unique[by_appearance]
    coords = torch.stack((lin % nz, (lin // nz) % ny, lin // (nz * ny)), dim=1).int()  # (z, y, x)
    return voxels, coords, counts.clamp(max=max_points).int()


def mean_features(voxels: Tensor, counts: Tensor) -> Tensor:
    """``[M, C]`` mean of each voxel's points.

    The slots are added one after another, so the sum's rounding does not depend on how a
    device schedules a reduction: CPU and CUDA give the same bits.
    """
    total = voxels[:, 0].clone()
    for k in range(1, voxels.shape[1]):
        total = total + voxels[:, k]
    return total / counts.clamp(min=1).to(voxels.dtype).unsqueeze(1)
