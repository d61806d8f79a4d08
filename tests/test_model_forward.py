"""Forward passes, bev_pool and the BEV axis conventions on the CPU."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from model_helpers import synthetic_batch, torch_threads

from bevfusion_ptq.model import build_model, load_config, load_model, make_checkpoint
from bevfusion_ptq.model.bev_pool import bev_pool, frustum_to_voxel_coords
from bevfusion_ptq.model.builder import MODELS

logger = logging.getLogger(__name__)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config("bevfusion-tiny")


@pytest.fixture(scope="module")
def tiny_model(tiny_cfg, tmp_path_factory):
    path = tmp_path_factory.mktemp("fwd") / "tiny.pth"
    make_checkpoint(path, tiny_cfg, seed=1)
    return load_model(tiny_cfg, path)


def _finite(x) -> bool:
    return bool(torch.isfinite(x).all())


def test_tiny_forward_shapes_and_finite(tiny_cfg, tiny_model) -> None:
    batch = synthetic_batch(tiny_cfg, batch_size=1, num_points=20000, seed=0)
    with torch.no_grad():
        tiny_model(batch)  # warm-up
        start = time.perf_counter()
        out = tiny_model(batch)
        elapsed = time.perf_counter() - start
    logger.info("bevfusion-tiny forward: %.3f s", elapsed)

    assert tuple(out["camera_bev"].shape) == (1, 32, 30, 30)
    assert tuple(out["lidar_bev"].shape) == (1, 64, 30, 30)
    assert tuple(out["fused_bev"].shape) == (1, 64, 30, 30)
    assert tuple(out["decoder_out"].shape) == (1, 128, 30, 30)
    preds = out["preds"]
    expected = {"center": 2, "height": 1, "dim": 3, "rot": 2, "vel": 2, "heatmap": 10, "query_heatmap_score": 10}
    for name, channels in expected.items():
        assert tuple(preds[name].shape) == (1, channels, 50), name
        assert _finite(preds[name]), name
    assert tuple(preds["query_labels"].shape) == (1, 50)
    assert tuple(preds["dense_heatmap"].shape) == (1, 10, 30, 30)
    for key in ("camera_bev", "lidar_bev", "fused_bev", "decoder_out"):
        assert _finite(out[key]), key
    assert float(out["camera_bev"].abs().sum()) > 0 and float(out["lidar_bev"].abs().sum()) > 0

    (boxes,) = out["boxes"]
    k = boxes["score"].shape[0]
    assert 0 < k <= 50
    shapes = {"center": (k, 3), "size": (k, 3), "yaw": (k,), "velocity": (k, 2), "score": (k,), "label": (k,)}
    for name, shape in shapes.items():
        assert tuple(boxes[name].shape) == shape, name
        assert _finite(boxes[name].float()), name
    assert bool((boxes["score"][:-1] >= boxes["score"][1:]).all())
    assert bool((boxes["size"] > 0).all())
    assert int(boxes["label"].min()) >= 0 and int(boxes["label"].max()) < 10
    assert elapsed < 10.0, f"tiny forward took {elapsed:.1f} s"


def test_batch_of_two_matches_single_samples(tiny_cfg, tiny_model) -> None:
    one = synthetic_batch(tiny_cfg, batch_size=1, num_points=5000, seed=5)
    two = synthetic_batch(tiny_cfg, batch_size=1, num_points=5000, seed=6)
    pair = {k: (v + two[k] if isinstance(v, list) else torch.cat([v, two[k]])) for k, v in one.items()}
    with torch.no_grad():
        single = tiny_model.extract_features(two)
        both = tiny_model.extract_features(pair)
    for key in ("camera_bev", "lidar_bev", "decoder_out"):
        torch.testing.assert_close(both[key][1:], single[key], rtol=1e-4, atol=1e-4)


def _naive_bev_pool(feats, coords, batch_size, grid):
    nx, ny, nz = grid
    out = torch.zeros(batch_size, feats.shape[1], nz, nx, ny, dtype=feats.dtype)
    for f, (b, x, y, z) in zip(feats, coords.tolist()):
        if 0 <= b < batch_size and 0 <= x < nx and 0 <= y < ny and 0 <= z < nz:
            out[b, :, z, x, y] += f
    return out


def test_bev_pool_matches_naive_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    grid = (7, 5, 3)
    feats = torch.randn(3000, 4, generator=gen, dtype=torch.float64)
    coords = torch.stack(
        [
            torch.randint(0, 2, (3000,), generator=gen),
            torch.randint(-2, 9, (3000,), generator=gen),  # some outside the grid
            torch.randint(-1, 6, (3000,), generator=gen),
            torch.randint(0, 4, (3000,), generator=gen),
        ],
        dim=1,
    )
    fast = bev_pool(feats, coords, 2, grid)
    assert tuple(fast.shape) == (2, 4, 3, 7, 5)
    torch.testing.assert_close(fast, _naive_bev_pool(feats, coords, 2, grid))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_frustum_cells_truncate_toward_zero(axis: int) -> None:
    """The engine's rule, per axis: fractional index -> int toward zero; keep 0 <= i < n.

    So -0.5 lands in cell 0 (a floor would drop it), -1.0 and -1.5 are dropped, n - 0.5
    is the last cell and n is outside.
    """
    grid = (4, 5, 1)  # one z slice, like BEVFusion's 20 m slab
    lower = torch.tensor([-2.0, -3.0, -10.0])
    cell = torch.tensor([1.0, 1.5, 20.0])  # exact in binary, so each index is exact
    n = grid[axis]
    fractional = torch.tensor([-1.5, -1.0, -0.5, 0.0, n - 0.5, float(n)], dtype=torch.float64)
    centre = torch.tensor([1.5, 2.5, 0.5], dtype=torch.float64)  # a valid index on the other axes
    frac = centre.repeat(len(fractional), 1)
    frac[:, axis] = fractional
    geom = (lower.double() + frac * cell.double()).float()
    coords = frustum_to_voxel_coords(geom, lower, cell)
    assert coords[:, axis].tolist() == [-1, -1, 0, 0, n - 1, n]

    feats = torch.arange(1, len(fractional) + 1, dtype=torch.float32).unsqueeze(1)
    batch0 = torch.zeros(len(coords), 1, dtype=torch.long)
    pooled = bev_pool(feats, torch.cat([batch0, coords], 1), 1, grid)
    assert pooled.sum().item() == 3 + 4 + 5  # only the points at -0.5, 0 and n - 0.5
    expected = torch.zeros_like(pooled)
    x, y, z = centre.long().tolist()
    for value, index in ((3 + 4, 0), (5, n - 1)):
        cell_at = [x, y, z]
        cell_at[axis] = index
        expected[0, 0, cell_at[2], cell_at[0], cell_at[1]] += value  # one cell when n == 1
    torch.testing.assert_close(pooled, expected)


def _lidar_branch(cfg):
    lidar = cfg.model.encoders.lidar
    return MODELS.build(lidar.voxelize).eval(), MODELS.build(lidar.backbone).eval()


@pytest.mark.parametrize("name, grid, channels", [("bevfusion-r50", 180, 256), ("bevfusion-tiny", 30, 64)])
def test_lidar_bev_orientation(name: str, grid: int, channels: int) -> None:
    """Points at x in [30, 50], y in [-50, -30] light up high rows and low columns only."""
    cfg = load_config(name)
    voxelize, backbone = _lidar_branch(cfg)
    gen = torch.Generator().manual_seed(0)
    n = 3000
    pts = torch.cat(
        [
            30 + 20 * torch.rand(n, 1, generator=gen),
            -50 + 20 * torch.rand(n, 1, generator=gen),
            -2 + 2 * torch.rand(n, 1, generator=gen),
            torch.rand(n, 2, generator=gen),
        ],
        dim=1,
    )
    with torch.no_grad():
        feats, coords, batch_size = voxelize([pts])
        bev = backbone(feats, coords, batch_size)
    assert tuple(bev.shape) == (1, channels, grid, grid)
    rows, cols = bev.abs().sum(dim=(0, 1)).nonzero(as_tuple=True)
    assert rows.numel() > 0
    cell = 108.0 / grid
    # x = 30..50 m -> rows (84..104) / cell; y = -50..-30 m -> cols (4..24) / cell; allow 2 cells
    assert int(rows.min()) >= int(84 / cell) - 2 and int(rows.max()) <= int(104 / cell) + 2
    assert int(cols.min()) >= int(4 / cell) - 2 and int(cols.max()) <= int(24 / cell) + 2


@pytest.mark.parametrize("yaw, axis, positive", [(0, "x", True), (90, "y", True), (180, "x", False)])
def test_camera_bev_orientation(tiny_cfg, yaw: float, axis: str, positive: bool) -> None:
    """One camera's frustum lands on its side of the ego, in the same [X, Y] layout."""
    vt = MODELS.build(tiny_cfg.model.encoders.camera.vtransform).eval()
    batch = synthetic_batch(tiny_cfg, yaws_deg=[yaw], num_points=10)
    geom = vt.get_geometry(
        batch["camera2lidar"], batch["camera_intrinsics"], batch["img_aug_matrix"], batch["lidar_aug_matrix"]
    )
    d, fh, fw = vt.frustum.shape[:3]
    feats = torch.ones(1, 1, d, fh, fw, 1)
    bev = vt.splat(geom, feats)[0, 0]  # [X, Y] before the downsample
    rows, cols = bev.nonzero(as_tuple=True)
    centre = bev.shape[0] / 2
    along = rows if axis == "x" else cols
    if positive:
        assert bool((along >= centre).all())
    else:
        assert bool((along < centre).all())


def test_depth_image_projects_points(tiny_cfg) -> None:
    """A point 10 m ahead of camera 0 at camera height lands on the principal point."""
    vt = MODELS.build(tiny_cfg.model.encoders.camera.vtransform).eval()
    point = torch.tensor([[10.0, 0.0, 1.6, 0.0, 0.0]])
    batch = synthetic_batch(tiny_cfg, yaws_deg=[0, 180], points=[point])
    depth = vt.depth_image(batch["points"], batch["lidar2image"], batch["img_aug_matrix"], batch["lidar_aug_matrix"])
    r = tiny_cfg.data.test_resize
    h, w = tiny_cfg.data.image_size
    u = 800 * r - (int(1600 * r) - w) // 2
    v = 450 * r - (int(900 * r) - h)
    cams, _, rows, cols = (depth[0] != 0).nonzero(as_tuple=True)
    assert cams.tolist() == [0]  # the camera looking backwards does not see it
    assert abs(int(rows[0]) - v) <= 1 and abs(int(cols[0]) - u) <= 1
    assert float(depth[0, 0, 0, rows[0], cols[0]]) == pytest.approx(10.0)


def test_build_model_registry_types(tiny_cfg) -> None:
    from mmdet.models.backbones.resnet import Bottleneck
    from mmdet3d.models.layers import SparseBasicBlock

    model = build_model(tiny_cfg)
    types = {type(m) for m in model.modules()}
    assert Bottleneck in types and SparseBasicBlock in types
    assert type(model.decoder.neck.deblocks[1][0]).__name__ == "ConvTranspose2d"
    assert type(model.decoder.neck.deblocks[0][0]).__name__ == "Conv2d"
    assert len(list(model.encoders.camera.neck.concats)) == 2


def _multi_sweep_cloud(sweeps: int, clustered: int, uniform: int, seed: int) -> torch.Tensor:
    """A merged multi-sweep cloud in the r50 range, sweep after sweep (5 dims, last = time
    lag): per sweep, ``clustered`` points tight around 300 fixed centres (voxels holding many
    more than 10 points) and ``uniform`` points spread everywhere (many distinct voxels)."""
    gen = torch.Generator().manual_seed(seed)
    low, span = torch.tensor([-54.0, -54.0, -5.0]), torch.tensor([108.0, 108.0, 8.0])
    centres = torch.rand(300, 3, generator=gen) * span + low
    clouds = []
    for sweep in range(sweeps):
        near = centres[torch.randint(0, 300, (clustered,), generator=gen)] + 0.03 * torch.randn(clustered, 3, generator=gen)
        far = torch.rand(uniform, 3, generator=gen) * span + low
        xyz = torch.cat([near, far])[torch.randperm(clustered + uniform, generator=gen)]
        n = clustered + uniform
        clouds.append(torch.cat([xyz, 255 * torch.rand(n, 1, generator=gen), torch.full((n, 1), 0.05 * sweep)], 1))
    return torch.cat(clouds)


@pytest.mark.parametrize(
    "name, max_voxels",
    [("bevfusion-tiny", None), ("bevfusion-tiny", 2000), ("bevfusion-r50", None), ("bevfusion-r50", 5000)],
)
def test_voxelize_backends_identical(name: str, max_voxels: int | None) -> None:
    """mmcv's op and the torch rule give the same voxels, order, kept points and mean bits,
    under the voxel cap and over it (the same voxels dropped)."""
    vox_cfg = dict(load_config(name).model.encoders.lidar.voxelize)
    if max_voxels is not None:
        vox_cfg["max_voxels"] = [max_voxels, max_voxels]
    pts = _multi_sweep_cloud(sweeps=10, clustered=2000, uniform=1000, seed=len(name) + (max_voxels or 0))
    outputs = {}
    for backend in ("mmcv", "torch"):
        vox = MODELS.build({**vox_cfg, "backend": backend}).eval()
        outputs[backend] = (vox._voxelize(pts, vox.max_voxels[1]), vox([pts]))
    (raw_m, (f_m, c_m, _)), (raw_t, (f_t, c_t, _)) = outputs["mmcv"], outputs["torch"]
    for a, b in zip(raw_m, raw_t):
        assert a.shape == b.shape and torch.equal(a, b)
    assert torch.equal(c_m, c_t) and torch.equal(f_m, f_t)
    counts = raw_m[2]
    assert int(counts.max()) == vox.max_num_points  # some voxels held more points than they keep
    assert (len(counts) == max_voxels) if max_voxels else (len(counts) < vox.max_voxels[1])


def test_voxelize_orders_axes_xyz(tiny_cfg) -> None:
    """Coordinates come out as (batch, ix, iy, iz), whichever backend voxelizes."""
    vox_cfg = dict(tiny_cfg.model.encoders.lidar.voxelize)
    gen = torch.Generator().manual_seed(2)
    pts = torch.cat(
        [torch.rand(4000, 3, generator=gen) * torch.tensor([6.0, 6.0, 1.0]) + torch.tensor([3.0, -8.0, -1.0]),
         torch.rand(4000, 2, generator=gen)],
        dim=1,
    )
    for backend in ("mmcv", "torch"):
        _, c1, _ = MODELS.build({**vox_cfg, "backend": backend}).eval()([pts])
        assert c1.shape[1] == 4 and int(c1[:, 0].max()) == 0
        # x = 3..9 m -> ix = (57..63) / 0.45, z = -1..0 m -> iz = (4..5) / 0.4
        assert int(c1[:, 1].min()) >= int(57 / 0.45) and int(c1[:, 1].max()) <= int(63 / 0.45)
        assert int(c1[:, 3].min()) >= int(4 / 0.4) and int(c1[:, 3].max()) <= int(5 / 0.4)


class _PeakHeatmap(torch.nn.Module):
    """Stands in for the heatmap head: one confident peak at (cls, row, col)."""

    def __init__(self, classes: int, cls: int, row: int, col: int) -> None:
        super().__init__()
        self.classes, self.cls, self.row, self.col = classes, cls, row, col

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        out = torch.full((feat.shape[0], self.classes, *feat.shape[-2:]), -10.0)
        out[:, self.cls, self.row, self.col] = 10.0
        return out


def test_head_decodes_rows_as_x(tiny_cfg) -> None:
    """A heatmap peak at row i, column j of the [X, Y] map decodes to x from i, y from j."""
    head = MODELS.build(tiny_cfg.model.heads.object).eval()
    head.heatmap_head = _PeakHeatmap(10, cls=2, row=20, col=5)
    last = head.prediction_heads[0].center[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    with torch.no_grad():
        preds = head(torch.randn(1, 128, 30, 30))
    (boxes,) = head.decode(preds)
    cell = 8 * 0.45
    assert int(boxes["label"][0]) == 2
    torch.testing.assert_close(boxes["center"][0, :2], torch.tensor([20.5 * cell - 54.0, 5.5 * cell - 54.0]))


def test_whole_model_pickles(tiny_cfg, tiny_model, tmp_path) -> None:
    """The pipeline hands whole models between stages with torch.save / torch.load."""
    path = tmp_path / "model.pt"
    batch = synthetic_batch(tiny_cfg, num_points=3000, seed=9)
    with torch.no_grad():
        before = tiny_model.extract_features(batch)
        torch.save(tiny_model, path)
        loaded = torch.load(path, map_location="cpu", weights_only=False)
        after = loaded.extract_features(batch)
    for key in before:
        torch.testing.assert_close(after[key], before[key])
