"""The generated tree loads like a user's nuScenes root, with consistent geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import (
    R50_DATA,
    TINY_DATA,
    generated_tree,
    load_infos,
    painted_hits,
    save_infos,
    to_mmdet3d_v2,
)

from bevfusion_ptq.data import build_calibration_set, move_batch, random_batch
from bevfusion_ptq.data.batch import collate
from bevfusion_ptq.data.geometry import points_in_boxes
from bevfusion_ptq.data.infos import read_info_file

MATRIX_KEYS = ("camera_intrinsics", "camera2lidar", "lidar2camera", "lidar2image", "camera2ego", "img_aug_matrix")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return generated_tree(tmp_path_factory)


def first_batches(cset, count=None, **loader_kwargs):
    batches = []
    for i, batch in enumerate(cset.loader(**{"num_workers": 0, **loader_kwargs})):
        batches.append(batch)
        if count is not None and i + 1 >= count:
            break
    return batches


@pytest.mark.parametrize("data_cfg", [TINY_DATA, R50_DATA], ids=["tiny", "r50"])
def test_batches_follow_the_contract(tree, data_cfg):
    cset = build_calibration_set(tree, "nuscenes_infos_train.pkl", data_cfg, num_samples=3)
    (batch,) = first_batches(cset, 1)
    h, w = data_cfg["image_size"]
    assert batch["img"].shape == (1, 6, 3, h, w) and batch["img"].dtype == torch.float32
    for key in MATRIX_KEYS:
        assert batch[key].shape == (1, 6, 4, 4) and batch[key].dtype == torch.float32, key
    assert batch["lidar2ego"].shape == (1, 4, 4)
    assert torch.equal(batch["lidar_aug_matrix"][0], torch.eye(4))
    (points,) = batch["points"]
    assert points.dtype == torch.float32 and points.shape[1] == 5 and len(points) > 10_000
    lo, hi = torch.tensor(data_cfg["point_cloud_range"][:3]), torch.tensor(data_cfg["point_cloud_range"][3:])
    assert ((points[:, :3] > lo) & (points[:, :3] < hi)).all()
    assert torch.isfinite(points).all()
    meta = batch["metas"][0]
    assert meta["token"] == cset.tokens[0] and isinstance(meta["timestamp"], int) and meta["scene_token"]
    # Geometry identities of the contract.
    l2i = batch["camera_intrinsics"][0] @ batch["lidar2camera"][0]
    assert torch.allclose(l2i, batch["lidar2image"][0], atol=1e-3)
    eye = batch["camera2lidar"][0] @ batch["lidar2camera"][0]
    assert torch.allclose(eye, torch.eye(4).expand(6, 4, 4), atol=1e-5)
    # camera2lidar = ego2lidar @ camera2ego up to the ego motion between camera and lidar times.
    ego2lidar = torch.linalg.inv(batch["lidar2ego"][0])
    assert torch.allclose(ego2lidar @ batch["camera2ego"][0], batch["camera2lidar"][0], atol=0.3)


def test_time_lag_channel(tree):
    cset = build_calibration_set(tree, None, TINY_DATA, num_samples=6)
    for batch in first_batches(cset):
        lags = batch["points"][0][:, 4].double().numpy()
        values = np.unique(np.round(lags, 3))
        assert values[0] == 0.0
        # 9 sweeps 50 ms apart after the keyframe; the first keyframe of a scene repeats itself.
        assert set(values) <= {0.0} | {round(0.05 * j, 3) for j in range(1, 10)}


def test_workers_give_the_same_batches(tree):
    cset = build_calibration_set(tree, None, TINY_DATA, num_samples=4)
    plain = first_batches(cset)
    workers = first_batches(cset, num_workers=2, prefetch_factor=2)
    assert [b["metas"][0]["token"] for b in workers] == cset.tokens
    for a, b in zip(plain, workers, strict=True):
        assert torch.equal(a["img"], b["img"]) and torch.equal(a["points"][0], b["points"][0])


@pytest.mark.parametrize("data_cfg", [R50_DATA, TINY_DATA], ids=["r50", "tiny"])
def test_box_corners_land_on_painted_pixels(tree, data_cfg):
    cset = build_calibration_set(tree, None, data_cfg, num_samples=8)
    batches = first_batches(cset)
    checked, hits = painted_hits(batches, data_cfg)
    assert checked >= 200, "too few fully visible objects to test the geometry"
    assert hits / checked > 0.98, f"{hits}/{checked} projected points landed on their object's colour"
    # Negative control: projections 3 network pixels off already miss visibly.
    checked, hits = painted_hits(batches, data_cfg, shift_px=3.0)
    assert hits / checked < 0.95


def test_train_aug_matrices_match_pixels_and_points(tree):
    cset = build_calibration_set(tree, None, R50_DATA, num_samples=8, pipeline="train-aug", seed=3)
    batches = first_batches(cset)
    assert any(not torch.equal(b["lidar_aug_matrix"][0], torch.eye(4)) for b in batches)
    assert any(b["img_aug_matrix"][0, 0, 0, 0] < 0 for b in batches), "no image flip drawn in 8 samples"
    checked, hits = painted_hits(batches, R50_DATA)
    assert checked >= 200 and hits / checked > 0.98, f"{hits}/{checked}"
    # Augmented points above the ground still sit in the augmented boxes.
    for batch in batches:
        meta = batch["metas"][0]
        points = batch["points"][0].numpy()
        key = points[points[:, 4] == 0]
        aug = batch["lidar_aug_matrix"][0].double().numpy()
        original = (key[:, :3] - aug[:3, 3]) @ np.linalg.inv(aug[:3, :3]).T
        lidar_height = 1.84
        raised = key[original[:, 2] > -lidar_height + 0.3]
        inside = points_in_boxes(raised[:, :3], meta["gt_boxes"], margin=0.15).any(axis=1)
        assert inside.mean() > 0.98


def test_train_aug_is_seeded(tree):
    def load(seed):
        cset = build_calibration_set(tree, None, TINY_DATA, num_samples=2, pipeline="train-aug", seed=seed)
        return first_batches(cset)

    a, b, c = load(1), load(1), load(2)
    assert torch.equal(a[0]["img"], b[0]["img"]) and torch.equal(a[0]["lidar_aug_matrix"], b[0]["lidar_aug_matrix"])
    assert not torch.equal(a[0]["lidar_aug_matrix"], c[0]["lidar_aug_matrix"])


def test_sweeps_align_on_static_objects(tree):
    """Sweep points, moved by sensor2lidar, land on the keyframe's static boxes."""
    cset = build_calibration_set(tree, None, R50_DATA, num_samples=8)
    tested = 0
    for batch in first_batches(cset):
        meta = batch["metas"][0]
        static = np.linalg.norm(meta["gt_velocity"], axis=1) < 1e-3
        if not static.any():
            continue
        points = batch["points"][0].numpy()
        sweep_pts = points[points[:, 4] > 0]
        boxes = meta["gt_boxes"][static]
        near = points_in_boxes(sweep_pts[:, :3], boxes, margin=1.0).any(axis=1)
        tight = points_in_boxes(sweep_pts[:, :3], boxes, margin=0.05).any(axis=1)
        if near.sum() < 20:
            continue
        tested += 1
        # Ground points near the box's foot are in "near" but not "tight": count only raised ones.
        raised = sweep_pts[:, 2] > -1.84 + 0.2
        assert (tight & raised).sum() / max((near & raised).sum(), 1) > 0.97
    assert tested >= 2


def test_mmdet3d_v2_infos_give_the_same_batches(tree, tmp_path):
    payload = load_infos(tree / "nuscenes_infos_train.pkl")
    v2_path = tmp_path / "nuscenes_infos_train_v2.pkl"
    save_infos(v2_path, to_mmdet3d_v2(payload))
    assert read_info_file(v2_path).flavour == "mmdet3d-v2"
    a = first_batches(build_calibration_set(tree, None, TINY_DATA, num_samples=3))
    b = first_batches(build_calibration_set(tree, v2_path, TINY_DATA, num_samples=3))
    for x, y in zip(a, b, strict=True):
        assert x["metas"][0]["token"] == y["metas"][0]["token"]
        assert torch.equal(x["img"], y["img"])
        assert torch.allclose(x["points"][0], y["points"][0], atol=1e-4)
        for key in (*MATRIX_KEYS, "lidar2ego"):
            assert torch.allclose(x[key], y[key], atol=1e-4), key
        assert np.allclose(x["metas"][0]["gt_boxes"], y["metas"][0]["gt_boxes"], atol=1e-4)
        assert x["metas"][0]["gt_names"] == y["metas"][0]["gt_names"]


def test_random_batch_and_move_batch():
    batch = random_batch({"data": TINY_DATA}, batch_size=2, num_points=500, seed=1)
    assert batch["img"].shape == (2, 6, 3, 128, 352)
    assert [p.shape for p in batch["points"]] == [(500, 5), (500, 5)]
    assert batch["lidar2ego"].shape == (2, 4, 4) and batch["lidar_aug_matrix"].shape == (2, 4, 4)
    for key in MATRIX_KEYS:
        assert batch[key].shape == (2, 6, 4, 4)
    assert torch.equal(random_batch(TINY_DATA, seed=1)["img"], random_batch(TINY_DATA, seed=1)["img"])
    moved = move_batch(batch, "cpu")
    assert moved["metas"] is batch["metas"] and torch.equal(moved["points"][1], batch["points"][1])
    again = collate([{key: value[0] for key, value in batch.items()}])
    assert again["img"].shape == (1, 6, 3, 128, 352)
