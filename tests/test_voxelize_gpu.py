"""CUDA voxelization gives, bit for bit, the voxels of the CPU path (mmcv's op, the reference's).

At r50 sizes: clouds of 10 merged sweeps and at least 250k points, one of them with more
occupied cells than the 160 000-voxel test cap, so the voxels dropped by the cap, the order of
the kept ones and the points a full voxel keeps are all compared. Runs on GPU hosts only.
"""

from __future__ import annotations

import pytest
import torch
from mmdet3d.registry import MODELS

from bevfusion_ptq.model.builder import build_model  # noqa: F401  (registers the modules)
from bevfusion_ptq.model.config import load_config

pytestmark = pytest.mark.gpu


def _sweeps(seed: int, per_sweep: int, sweeps: int, clusters: int | None) -> torch.Tensor:
    """A merged multi-sweep cloud inside the r50 range: clustered (dense voxels holding more
    than 10 points) or uniform (nearly one point a cell, so very many cells)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.tensor([-54.0, -54.0, -5.0])
    span = torch.tensor([108.0, 108.0, 8.0])
    centres = torch.rand(clusters or 1, 3, generator=gen) * span + low
    parts = []
    for sweep in range(sweeps):
        if clusters:
            pick = torch.randint(0, clusters, (per_sweep,), generator=gen)
            xyz = centres[pick] + 0.05 * torch.randn(per_sweep, 3, generator=gen)
        else:
            xyz = torch.rand(per_sweep, 3, generator=gen) * span + low
        extra = torch.cat([255 * torch.rand(per_sweep, 1, generator=gen), torch.full((per_sweep, 1), 0.05 * sweep)], 1)
        parts.append(torch.cat([xyz, extra], 1))
    return torch.cat(parts)


@pytest.mark.parametrize(
    "cloud",
    [dict(seed=0, per_sweep=26_000, sweeps=10, clusters=5_000), dict(seed=1, per_sweep=40_000, sweeps=10, clusters=None)],
    ids=["clustered-260k", "uniform-400k-over-cap"],
)
def test_cuda_voxels_equal_cpu_voxels_at_r50_size(cloud: dict) -> None:
    vox_cfg = dict(load_config("bevfusion-r50").model.encoders.lidar.voxelize)
    vox = MODELS.build(vox_cfg).eval()
    assert vox.backend_for(torch.device("cpu")) == "mmcv" and vox.backend_for(torch.device("cuda")) == "torch"
    pts = _sweeps(**cloud)
    assert pts.shape[0] >= 250_000
    budget = vox.max_voxels[1]
    cpu_raw = vox._voxelize(pts, budget)
    cuda_raw = [t.cpu() for t in vox._voxelize(pts.cuda(), budget)]
    for what, a, b in zip(("voxels", "coords", "counts"), cpu_raw, cuda_raw):
        assert a.shape == b.shape, what
        assert torch.equal(a, b), what
    feats_cpu, coords_cpu, _ = vox([pts])
    feats_cuda, coords_cuda, _ = vox([pts.cuda()])
    assert torch.equal(coords_cpu, coords_cuda.cpu())
    assert torch.equal(feats_cpu, feats_cuda.cpu())
    counts = cpu_raw[2]
    print(f"{cloud}: {pts.shape[0]} points -> {counts.numel()} voxels (cap {budget}), "
          f"{int((counts == vox.max_num_points).sum())} full voxels")
    if cloud["clusters"] is None:
        assert counts.numel() == budget  # over the cap: the same 160 000 kept
    else:
        assert int(counts.max()) == vox.max_num_points  # voxels that held more than 10 points
