"""Helpers for the data tests: configs, a shared generated tree, projections, colour checks."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from bevfusion_ptq.data.generate import CLASS_COLORS, make_dataset
from bevfusion_ptq.data.geometry import box_corners, invert_rigid, pose, rigid
from bevfusion_ptq.data.rig import NUSCENES_IMAGE_SIZE

# The reference's data section (contracts), and a tiny variant: 0.24 * 1600x900 = 384x216,
# cropped to 352x128 bottom-aligned and centred.
R50_DATA: dict[str, Any] = dict(
    image_size=[256, 704],
    point_cloud_range=[-54.0, -54.0, -5.0, 54.0, 54.0, 3.0],
    voxel_size=[0.075, 0.075, 0.2],
    sweeps_num=9,
    load_dim=5,
    use_dim=5,
    img_norm=dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    test_resize=0.48,
    train_aug=dict(
        resize_lim=[0.38, 0.55],
        rot_lim=[-5.4, 5.4],
        rand_flip=True,
        global_rot=[-0.785, 0.785],
        global_scale=[0.9, 1.1],
        global_translate_std=0.5,
    ),
)
TINY_DATA: dict[str, Any] = {
    **R50_DATA,
    "image_size": [128, 352],
    "test_resize": 0.24,
    "point_cloud_range": [-40.0, -40.0, -5.0, 40.0, 40.0, 3.0],
    "voxel_size": [0.1, 0.1, 0.2],
}

_TREES: dict[tuple, Path] = {}


def generated_tree(tmp_path_factory: pytest.TempPathFactory, scenes: int = 3, frames: int = 4, seed: int = 0) -> Path:
    """A generated nuScenes tree shared by every test of the session (treat it as read-only)."""
    key = (scenes, frames, seed)
    if key not in _TREES:
        root = tmp_path_factory.mktemp(f"nusc_{scenes}x{frames}_s{seed}")
        make_dataset(root, scenes=scenes, frames=frames, seed=seed)
        _TREES[key] = root
    return _TREES[key]


def linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a tree whose files are symlinks, so a test can replace a few files cheaply."""
    shutil.copytree(src, dst, copy_function=os.symlink)
    for info in dst.glob("*.pkl"):  # real copies: tests edit info files
        info.unlink()
        shutil.copyfile(src / info.name, info)
    return dst


def make_real(path: Path) -> Path:
    """Replace a symlink from :func:`linked_copy` by a real copy of its target."""
    target = path.resolve()
    path.unlink()
    shutil.copyfile(target, path)
    return path


def load_infos(path: Path) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh)


def save_infos(path: Path, payload: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(payload, fh)


def denormalise(img: torch.Tensor, data_cfg: dict) -> np.ndarray:
    """[N, 3, H, W] normalised -> [N, H, W, 3] uint8-range float RGB."""
    mean = torch.tensor(data_cfg["img_norm"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_cfg["img_norm"]["std"]).view(1, 3, 1, 1)
    return ((img * std + mean) * 255.0).permute(0, 2, 3, 1).numpy()


_CHROMA = {name: np.asarray(rgb, np.float64) / np.sum(rgb) for name, rgb in CLASS_COLORS.items()}


def painted_class(rgb: np.ndarray) -> str | None:
    """The class whose colour painted this pixel, by chromaticity; None for greyish pixels."""
    rgb = np.asarray(rgb, np.float64)
    if rgb.max() - rgb.min() < 40:
        return None
    chroma = rgb / max(rgb.sum(), 1e-6)
    return min(_CHROMA, key=lambda name: float(np.linalg.norm(_CHROMA[name] - chroma)))


def project_to_network_pixels(xyz_aug: np.ndarray, batch: dict, b: int, cam: int) -> tuple[np.ndarray, np.ndarray]:
    """Points of the (augmented) lidar frame -> network-image pixels, the way the model does it:
    undo lidar_aug_matrix, lidar2image, divide by depth, img_aug_matrix. Returns (uv, depth)."""
    aug = batch["lidar_aug_matrix"][b].double().numpy()
    xyz = (xyz_aug - aug[:3, 3]) @ np.linalg.inv(aug[:3, :3]).T
    l2i = batch["lidar2image"][b, cam].double().numpy()
    cam_pts = xyz @ l2i[:3, :3].T + l2i[:3, 3]
    depth = cam_pts[:, 2]
    uvz = np.concatenate([cam_pts[:, :2] / depth[:, None], np.ones((len(depth), 1))], axis=1)
    img_aug = batch["img_aug_matrix"][b, cam].double().numpy()
    uv = (uvz @ img_aug[:3, :3].T + img_aug[:3, 3])[:, :2]
    return uv, depth


def interior_points(boxes: np.ndarray, shrink: float = 0.55) -> np.ndarray:
    """[K, 9, 3]: each box's corners pulled towards its centre, plus the centre."""
    corners = box_corners(boxes)
    centres = boxes[:, None, :3]
    inner = centres + shrink * (corners - centres)
    return np.concatenate([inner, centres], axis=1)


def to_mmdet3d_v2(payload: dict) -> dict:
    """Rewrite a BEVFusion info payload as mmdet3d 1.x's ``update_infos_to_v2`` would.

    Written from the documented meaning of each field (test-only): file names without folders,
    timestamps in seconds, 4x4 matrices, a lidar2sensor per sweep, boxes by bottom centre.
    """
    classes = [
        "car",
        "truck",
        "trailer",
        "bus",
        "construction_vehicle",
        "bicycle",
        "motorcycle",
        "pedestrian",
        "traffic_cone",
        "barrier",
    ]
    data_list = []
    for info in payload["infos"]:
        lidar2ego = pose(info["lidar2ego_rotation"], info["lidar2ego_translation"])
        entry: dict[str, Any] = {
            "token": info["token"],
            "timestamp": info["timestamp"] / 1e6,
            "ego2global": pose(info["ego2global_rotation"], info["ego2global_translation"]).tolist(),
            "lidar_points": {
                "num_pts_feats": 5,
                "lidar_path": Path(info["lidar_path"]).name,
                "lidar2ego": lidar2ego.tolist(),
            },
            "lidar_sweeps": [],
            "images": {},
            "instances": [],
        }
        for sweep in info["sweeps"]:
            sensor2lidar = rigid(sweep["sensor2lidar_rotation"], sweep["sensor2lidar_translation"])
            entry["lidar_sweeps"].append(
                {
                    "lidar_points": {
                        "lidar_path": sweep["data_path"],
                        "lidar2ego": pose(sweep["sensor2ego_rotation"], sweep["sensor2ego_translation"]).tolist(),
                        "lidar2sensor": invert_rigid(sensor2lidar).tolist(),
                    },
                    "timestamp": sweep["timestamp"] / 1e6,
                    "ego2global": pose(sweep["ego2global_rotation"], sweep["ego2global_translation"]).tolist(),
                }
            )
        for name, cam in info["cams"].items():
            cam2lidar = rigid(cam["sensor2lidar_rotation"], cam["sensor2lidar_translation"])
            entry["images"][name] = {
                "img_path": Path(cam["data_path"]).name,
                "cam2img": np.asarray(cam["cam_intrinsic"]).tolist(),
                "lidar2cam": invert_rigid(cam2lidar).tolist(),
                "cam2ego": pose(cam["sensor2ego_rotation"], cam["sensor2ego_translation"]).tolist(),
                "timestamp": cam["timestamp"] / 1e6,
            }
        for box, name, vel in zip(info["gt_boxes"], info["gt_names"], info["gt_velocity"], strict=True):
            x, y, z, width, length, height, r = box
            entry["instances"].append(
                {
                    "bbox_3d": [x, y, z - height / 2, length, width, height, -r - np.pi / 2],
                    "bbox_label_3d": classes.index(str(name)),
                    "velocity": list(vel),
                }
            )
        data_list.append(entry)
    return {
        "metainfo": {
            "categories": {c: i for i, c in enumerate(classes)},
            "dataset": "nuscenes",
            "image_size": payload["metadata"]["image_size"],
        },
        "data_list": data_list,
    }


def painted_hits(batches: list[dict], data_cfg: dict, shrink: float = 0.9, shift_px: float = 0.0) -> tuple[int, int]:
    """(checked, hits): interior points of gt boxes projected into the network images, and how
    many land on a pixel painted in their class colour.

    Only boxes entirely in front of a camera, inside both the source and the network image and
    at least 12 px wide and high are used; points that a nearer box's outline covers are
    skipped (occluded). ``shift_px`` moves every projection right, as a negative control.
    """
    checked = hits = 0
    h, w = data_cfg["image_size"]
    for batch in batches:
        meta = batch["metas"][0]
        boxes = np.asarray(meta["gt_boxes"], np.float64)
        if not len(boxes):
            continue
        images = denormalise(batch["img"][0], data_cfg)
        for cam in range(6):
            outlines = [
                project_to_network_pixels(box_corners(boxes[k : k + 1])[0], batch, 0, cam) for k in range(len(boxes))
            ]
            for k, name in enumerate(meta["gt_names"]):
                corners_uv, corners_depth = outlines[k]
                if not _fully_visible(corners_uv, corners_depth, box_corners(boxes[k : k + 1])[0], batch, cam, (h, w)):
                    continue
                uv, _ = project_to_network_pixels(interior_points(boxes[k : k + 1], shrink)[0], batch, 0, cam)
                uv[:, 0] += shift_px
                nearer = [
                    cv2.convexHull(juv.astype(np.float32))
                    for j, (juv, jdepth) in enumerate(outlines)
                    if j != k and (jdepth > 0.5).all() and jdepth.mean() < corners_depth.mean()
                ]
                for u, v in uv:
                    if any(cv2.pointPolygonTest(hull, (float(u), float(v)), False) >= 0 for hull in nearer):
                        continue
                    checked += 1
                    hits += painted_class(images[cam, int(np.clip(v, 0, h - 1)), int(np.clip(u, 0, w - 1))]) == name
    return checked, hits


def _fully_visible(
    uv: np.ndarray, depth: np.ndarray, corners: np.ndarray, batch: dict, cam: int, hw: tuple[int, int]
) -> bool:
    h, w = hw
    if not (depth > 1.0).all() or np.ptp(uv[:, 0]) < 12 or np.ptp(uv[:, 1]) < 12:
        return False
    if not ((uv[:, 0] > 4) & (uv[:, 0] < w - 4) & (uv[:, 1] > 4) & (uv[:, 1] < h - 4)).all():
        return False
    # Inside the source image too: train-aug crops can reach past its border (black padding).
    aug = batch["lidar_aug_matrix"][0].double().numpy()
    xyz = (corners - aug[:3, 3]) @ np.linalg.inv(aug[:3, :3]).T
    l2i = batch["lidar2image"][0, cam].double().numpy()
    pix = xyz @ l2i[:3, :3].T + l2i[:3, 3]
    pix = pix[:, :2] / pix[:, 2:3]
    src_h, src_w = NUSCENES_IMAGE_SIZE  # the generated trees' size
    return bool(((pix[:, 0] > 0) & (pix[:, 0] < src_w) & (pix[:, 1] > 0) & (pix[:, 1] < src_h)).all())
