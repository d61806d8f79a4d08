"""The generator writes the nuScenes layout, deterministically, with consistent sensors."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import generated_tree, load_infos
from PIL import Image

from bevfusion_ptq.data import make_dataset, read_info_file
from bevfusion_ptq.data.geometry import points_in_boxes
from bevfusion_ptq.data.infos import NUSCENES_CLASSES
from bevfusion_ptq.data.rig import CAMERA_NAMES


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return generated_tree(tmp_path_factory)


def test_layout_matches_nuscenes(tree):
    for cam in CAMERA_NAMES:
        images = sorted((tree / "samples" / cam).glob("*.jpg"))
        assert len(images) == 12  # 3 scenes x 4 keyframes
        assert f"__{cam}__" in images[0].name
        with Image.open(images[0]) as im:
            assert im.size == (1600, 900) and im.format == "JPEG"
    keyframes = sorted((tree / "samples" / "LIDAR_TOP").glob("*.pcd.bin"))
    sweeps = sorted((tree / "sweeps" / "LIDAR_TOP").glob("*.pcd.bin"))
    assert len(keyframes) == 12 and len(sweeps) == 3 * 3 * 9  # 9 sweeps between keyframes
    assert all(p.stat().st_size % 20 == 0 for p in keyframes + sweeps)
    train, val = read_info_file(tree / "nuscenes_infos_train.pkl"), read_info_file(tree / "nuscenes_infos_val.pkl")
    assert (len(train), len(val), train.flavour) == (8, 4, "bevfusion")
    info = load_infos(tree / "nuscenes_infos_train.pkl")["infos"][1]
    assert info["lidar_path"].startswith("./data/nuscenes/samples/LIDAR_TOP/")
    assert list(info["cams"]) == list(CAMERA_NAMES) and len(info["sweeps"]) == 10
    k = info["cams"]["CAM_FRONT"]["cam_intrinsic"]
    assert 1200 < k[0, 0] < 1300 and 750 < k[0, 2] < 850 and 420 < k[1, 2] < 520


def test_scenes_hold_real_objects(tree):
    names = set()
    for split in ("train", "val"):
        for info in load_infos(tree / f"nuscenes_infos_{split}.pkl")["infos"]:
            assert 3 <= len(info["gt_boxes"]) and set(info["gt_names"]) <= set(NUSCENES_CLASSES)
            assert info["num_lidar_pts"].sum() > 200
            names |= set(info["gt_names"])
    assert len(names) >= 5


def test_lidar_points_above_ground_lie_on_boxes(tree):
    infos = read_info_file(tree / "nuscenes_infos_train.pkl")
    for i in range(len(infos)):
        record = infos.record(i, tree)
        points = np.fromfile(record.lidar_path, dtype=np.float32).reshape(-1, 5)
        ground_z = -record.lidar2ego[2, 3]  # the ego frame's origin is on the ground
        assert np.abs(points[points[:, 2] < ground_z + 0.05, 2] - ground_z).max() < 0.1
        raised = points[points[:, 2] > ground_z + 0.1]
        assert len(raised) > 100
        # Boxes are annotated within 60 m; points hit up to 70 m.
        raised = raised[np.linalg.norm(raised[:, :2], axis=1) < 55]
        assert points_in_boxes(raised[:, :3], record.gt_boxes, margin=0.1).any(axis=1).mean() > 0.99


def test_same_seed_same_bytes(tmp_path):
    a = make_dataset(tmp_path / "a", scenes=2, frames=2, seed=4, image_size=(225, 400))
    b = make_dataset(tmp_path / "b", scenes=2, frames=2, seed=4, image_size=(225, 400))
    c = make_dataset(tmp_path / "c", scenes=2, frames=2, seed=5, image_size=(225, 400))
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b.root) for p in b.root.rglob("*") if p.is_file())
    assert all((a.root / f).read_bytes() == (b.root / f).read_bytes() for f in files)
    assert (a.train_info.read_bytes()) != c.train_info.read_bytes()
    assert read_info_file(a.train_info).source_image_size == (225, 400)
