"""The nuScenes database tables of a generated tree, so nuscenes-devkit runs on it unchanged.

The model reads BEVFusion info files, but nuScenes metrics come from the devkit, which reads
the 13 JSON tables of ``<root>/<version>/`` (``NuScenes(version, dataroot)``) and nothing
else. This module writes those tables for a generated tree, from the generator's own world
state (where each object really is), not from the info files: the ground truth then does not
share a conversion with the prediction path, so a wrong centre, size or yaw convention in
the latter shows up as a lower mAP instead of cancelling out.

What the devkit relies on, and how we satisfy it:

- ``version`` ends in ``trainval`` and every scene is named after a scene of the devkit's
  fixed split lists (``create_splits_scenes()``): ``DetectionEval``'s ``load_gt`` keeps only
  samples whose scene name is in the requested split. Train scenes take train names, val
  scenes val names, in order.
- ``sample_annotation``: centre of the box volume in the global frame, size as
  width/length/height, rotation as a quaternion, ``prev``/``next`` per instance (the devkit
  derives ground-truth velocity from neighbouring annotations), one attribute for the classes
  that have attributes, and ``num_lidar_pts`` counted in the keyframe point cloud that was
  written (``filter_eval_boxes`` drops boxes without points).
- ``sample_data`` for LIDAR_TOP (keyframes and sweeps) and the six cameras, each with its
  ``ego_pose`` (same token, as in nuScenes) and ``calibrated_sensor``; ``sample`` with its
  ``prev``/``next`` chain; ``scene``, ``log``, ``map`` (with the mask file ``NuScenes``
  asserts on), ``category``, ``attribute``, ``visibility``, ``instance``, ``sensor``.

Visibility in nuScenes is the visible share of an object in the cameras; the generator does
not compute camera occlusion, so we record ``v80-100`` for objects the lidar hits and
``v0-40`` for the others. No metric reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from bevfusion_ptq.data.geometry import matrix_to_quaternion, points_in_boxes, pose, rot_z, transform_points
from bevfusion_ptq.data.rig import CAMERA_NAMES, LIDAR_NAME

log = logging.getLogger(__name__)

#: The tables ``NuScenes(version, dataroot)`` loads, each ``<root>/<version>/<name>.json``.
TABLE_NAMES: tuple[str, ...] = (
    "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor",
    "ego_pose", "log", "scene", "sample", "sample_data", "sample_annotation", "map",
)  # fmt: skip
#: The version generated trees are written as: the devkit ties split "val" to "*trainval".
GENERATED_VERSION = "v1.0-trainval"

#: nuScenes category of each detection class (the devkit maps them back to the class).
CATEGORY_OF_CLASS: dict[str, str] = {
    "car": "vehicle.car",
    "truck": "vehicle.truck",
    "construction_vehicle": "vehicle.construction",
    "bus": "vehicle.bus.rigid",
    "trailer": "vehicle.trailer",
    "barrier": "movable_object.barrier",
    "motorcycle": "vehicle.motorcycle",
    "bicycle": "vehicle.bicycle",
    "pedestrian": "human.pedestrian.adult",
    "traffic_cone": "movable_object.trafficcone",
}
ATTRIBUTE_NAMES: tuple[str, ...] = (
    "vehicle.moving", "vehicle.stopped", "vehicle.parked", "cycle.with_rider", "cycle.without_rider",
    "pedestrian.sitting_lying_down", "pedestrian.standing", "pedestrian.moving",
)  # fmt: skip
_VISIBILITY = (("1", "v0-40"), ("2", "v40-60"), ("3", "v60-80"), ("4", "v80-100"))
_VEHICLES = frozenset({"car", "truck", "construction_vehicle", "bus", "trailer"})
_MOVING_MPS = 0.2  # speed above which an object counts as moving
# Lidar returns sit on a box's faces with 1 cm range noise, so about half of them fall just
# outside the exact box; counting within a small margin keeps the count close to the number
# of rays that hit the object.
_POINT_MARGIN_M = 0.05


@dataclass(frozen=True)
class GeneratedScene:
    """What the table writer needs of one generated scene.

    ``infos`` are its keyframes' BEVFusion info entries in time order (tokens, timestamps,
    file paths, poses and calibrations); ``object_tokens`` and ``object_names`` list its
    objects (instance token, detection class); ``boxes_at(timestamp_us)`` gives their true
    global boxes ``[K, 7]`` (volume centre, l w h, heading) and velocities ``[K, 2]``;
    ``lidar_tokens`` are the keyframes' LIDAR_TOP sample_data tokens (the info entries name
    only the sweeps').
    """

    token: str
    split: str  # "train" or "val"
    infos: Sequence[Mapping[str, Any]]
    object_tokens: Sequence[str]
    object_names: Sequence[str]
    boxes_at: Callable[[int], tuple[np.ndarray, np.ndarray]]
    lidar_tokens: Sequence[str]


def token(*parts: object) -> str:
    """A nuScenes-looking 32-hex token, stable for the same parts."""
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def attribute_of(name: str, speed: float) -> str | None:
    """The true attribute of a generated object: its class and whether it moves.

    Generated vehicles either drive or are parked at the kerb, cycles move only with a rider,
    pedestrians walk; barriers and cones have no attribute in nuScenes.
    """
    moving = speed > _MOVING_MPS
    if name in _VEHICLES:
        return "vehicle.moving" if moving else "vehicle.parked"
    if name in ("motorcycle", "bicycle"):
        return "cycle.with_rider" if moving else "cycle.without_rider"
    if name == "pedestrian":
        return "pedestrian.moving" if moving else "pedestrian.standing"
    return None


def _relative(path: str) -> str:
    """Info paths (``./data/nuscenes/samples/...``) -> the table's ``samples/...`` form."""
    parts = PurePosixPath(path).parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("samples", "sweeps"):
            return "/".join(parts[i:])
    raise ValueError(f"path has no samples/ or sweeps/ component: {path}")


def _pose_record(tok: str, ts: int, rotation: Sequence[float], translation: Sequence[float]) -> dict:
    return {"token": tok, "timestamp": int(ts), "rotation": [float(v) for v in rotation],
            "translation": [float(v) for v in translation]}  # fmt: skip


def _link(records: list[dict]) -> None:
    """Set ``prev``/``next`` along a time-ordered chain."""
    for i, rec in enumerate(records):
        rec["prev"] = records[i - 1]["token"] if i else ""
        rec["next"] = records[i + 1]["token"] if i + 1 < len(records) else ""


class _Tables:
    """The 13 tables being filled, plus token bookkeeping shared by the scenes."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rows: dict[str, list[dict]] = {name: [] for name in TABLE_NAMES}
        self.calibrations: set[str] = set()
        self.category_token = {name: token("category", cat) for name, cat in CATEGORY_OF_CLASS.items()}
        for i, (name, cat) in enumerate(CATEGORY_OF_CLASS.items()):
            self.rows["category"].append(
                {"token": self.category_token[name], "name": cat, "description": f"generated {name}", "index": i}
            )
        self.attribute_token = {name: token("attribute", name) for name in ATTRIBUTE_NAMES}
        self.rows["attribute"] = [{"token": t, "name": n, "description": n} for n, t in self.attribute_token.items()]
        self.rows["visibility"] = [
            {"token": t, "level": level, "description": f"visibility of whole object is {level[1:]}%"}
            for t, level in _VISIBILITY
        ]
        self.sensor_token = {ch: token("sensor", ch) for ch in (LIDAR_NAME, *CAMERA_NAMES)}
        self.rows["sensor"] = [
            {"token": t, "channel": ch, "modality": "lidar" if ch == LIDAR_NAME else "camera"}
            for ch, t in self.sensor_token.items()
        ]

    def add_scene(self, root: Path, scene: GeneratedScene, name: str) -> None:
        infos = list(scene.infos)
        if not infos:
            raise ValueError(f"scene {scene.token} has no keyframes")
        log_token = token(scene.token, "log")
        self.rows["log"].append({
            "token": log_token, "logfile": f"generated-{self.seed}-{name}", "vehicle": "generated",
            "date_captured": "2026-01-01", "location": str(infos[0].get("location", "generated")),
        })  # fmt: skip
        samples = [
            {"token": str(info["token"]), "timestamp": int(info["timestamp"]), "scene_token": scene.token}
            for info in infos
        ]
        _link(samples)
        self.rows["sample"] += samples
        self.rows["scene"].append({
            "token": scene.token, "log_token": log_token, "nbr_samples": len(samples),
            "first_sample_token": samples[0]["token"], "last_sample_token": samples[-1]["token"],
            "name": name, "description": "generated scene: a curving road with traffic, kerb objects and pedestrians",
        })  # fmt: skip
        self._sensor_data(root, scene, infos)
        self._annotations(root, scene, infos)

    def _calibration(self, scene: GeneratedScene, channel: str, rotation, translation, intrinsic) -> str:
        tok = token(scene.token, "calibrated_sensor", channel)
        if tok not in self.calibrations:
            self.calibrations.add(tok)
            self.rows["calibrated_sensor"].append({
                "token": tok, "sensor_token": self.sensor_token[channel],
                "translation": [float(v) for v in translation], "rotation": [float(v) for v in rotation],
                "camera_intrinsic": [] if intrinsic is None else np.asarray(intrinsic, dtype=float).tolist(),
            })  # fmt: skip
        return tok

    def _sensor_data(self, root: Path, scene: GeneratedScene, infos: list[Mapping[str, Any]]) -> None:
        first = infos[0]
        lidar_cs = self._calibration(
            scene, LIDAR_NAME, first["lidar2ego_rotation"], first["lidar2ego_translation"], None
        )
        chains: dict[str, dict[str, dict]] = {ch: {} for ch in (LIDAR_NAME, *CAMERA_NAMES)}

        def add(channel: str, tok: str, sample: str, ts: int, path: str, key: bool, ego_rot, ego_trans,
                cs: str, size: tuple[int, int]) -> None:
            if tok in chains[channel]:
                return  # a keyframe also listed as the next keyframe's oldest sweep
            chains[channel][tok] = {
                "token": tok, "sample_token": sample, "ego_pose_token": tok, "calibrated_sensor_token": cs,
                "timestamp": int(ts), "fileformat": "pcd" if channel == LIDAR_NAME else "jpg",
                "is_key_frame": key, "height": size[0], "width": size[1], "filename": _relative(path),
            }  # fmt: skip
            self.rows["ego_pose"].append(_pose_record(tok, ts, ego_rot, ego_trans))

        image_size = None
        for info, lidar_token in zip(infos, scene.lidar_tokens, strict=True):
            sample = str(info["token"])
            add(LIDAR_NAME, lidar_token, sample, info["timestamp"], info["lidar_path"], True,
                info["ego2global_rotation"], info["ego2global_translation"], lidar_cs, (0, 0))  # fmt: skip
            for sweep in info["sweeps"]:
                add(LIDAR_NAME, sweep["sample_data_token"], sample, sweep["timestamp"], sweep["data_path"], False,
                    sweep["ego2global_rotation"], sweep["ego2global_translation"], lidar_cs, (0, 0))  # fmt: skip
            for channel in CAMERA_NAMES:
                cam = info["cams"][channel]
                if image_size is None:
                    image_size = _image_size(root / _relative(cam["data_path"]))
                cs = self._calibration(scene, channel, cam["sensor2ego_rotation"], cam["sensor2ego_translation"],
                                       cam["cam_intrinsic"])  # fmt: skip
                add(channel, cam["sample_data_token"], sample, cam["timestamp"], cam["data_path"], True,
                    cam["ego2global_rotation"], cam["ego2global_translation"], cs, image_size)  # fmt: skip
        for chain in chains.values():
            records = sorted(chain.values(), key=lambda r: r["timestamp"])
            _link(records)
            self.rows["sample_data"] += records

    def _annotations(self, root: Path, scene: GeneratedScene, infos: list[Mapping[str, Any]]) -> None:
        per_object: list[list[dict]] = [[] for _ in scene.object_tokens]
        for info in infos:
            boxes, velocity = scene.boxes_at(int(info["timestamp"]))
            counts = _points_per_box(root, info, boxes)
            for k, (inst, name) in enumerate(zip(scene.object_tokens, scene.object_names, strict=True)):
                x, y, z, length, width, height, heading = (float(v) for v in boxes[k])
                attribute = attribute_of(name, float(np.linalg.norm(velocity[k])))
                per_object[k].append({
                    "token": token(inst, "annotation", info["token"]), "sample_token": str(info["token"]),
                    "instance_token": inst, "visibility_token": "4" if counts[k] else "1",
                    "attribute_tokens": [] if attribute is None else [self.attribute_token[attribute]],
                    "translation": [x, y, z], "size": [width, length, height],
                    "rotation": matrix_to_quaternion(rot_z(heading)),
                    "num_lidar_pts": int(counts[k]), "num_radar_pts": 0,
                })  # fmt: skip
        for inst, name, anns in zip(scene.object_tokens, scene.object_names, per_object, strict=True):
            _link(anns)
            self.rows["sample_annotation"] += anns
            self.rows["instance"].append({
                "token": inst, "category_token": self.category_token[name], "nbr_annotations": len(anns),
                "first_annotation_token": anns[0]["token"], "last_annotation_token": anns[-1]["token"],
            })  # fmt: skip

    def write(self, root: Path, version: str) -> Path:
        map_token = token("map", self.seed)
        mask = PurePosixPath("maps") / f"{map_token}.png"
        _write_mask(root / mask)
        self.rows["map"] = [{"token": map_token, "log_tokens": [r["token"] for r in self.rows["log"]],
                             "category": "semantic_prior", "filename": str(mask)}]  # fmt: skip
        folder = root / version
        folder.mkdir(parents=True, exist_ok=True)
        for name in TABLE_NAMES:
            (folder / f"{name}.json").write_text(json.dumps(self.rows[name], indent=0) + "\n")
        return folder


def _image_size(path: Path) -> tuple[int, int]:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FileNotFoundError(f"cannot read {path}")
    return int(image.shape[0]), int(image.shape[1])


def _write_mask(path: Path) -> None:
    """The map mask ``NuScenes`` asserts exists: a small blank (all non-drivable) image."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.zeros((64, 64), dtype=np.uint8)):
        raise OSError(f"cannot write {path}")


def _points_per_box(root: Path, info: Mapping[str, Any], boxes_global: np.ndarray) -> np.ndarray:
    """Lidar points of the keyframe file inside each global box (see :data:`_POINT_MARGIN_M`)."""
    if not len(boxes_global):
        return np.zeros(0, dtype=np.int64)
    points = np.fromfile(root / _relative(info["lidar_path"]), dtype=np.float32).reshape(-1, 5)[:, :3]
    lidar2global = pose(info["ego2global_rotation"], info["ego2global_translation"]) @ pose(
        info["lidar2ego_rotation"], info["lidar2ego_translation"]
    )
    xyz = transform_points(lidar2global, points.astype(np.float64))
    near = np.linalg.norm(boxes_global[:, :2] - lidar2global[:2, 3], axis=1) < 100.0
    counts = np.zeros(len(boxes_global), dtype=np.int64)
    if near.any():
        counts[near] = points_in_boxes(xyz, boxes_global[near], margin=_POINT_MARGIN_M).sum(axis=0)
    return counts


def write_nuscenes_tables(root: str | Path, scenes: Sequence[GeneratedScene], seed: int = 0,
                          version: str = GENERATED_VERSION) -> Path:  # fmt: skip
    """Write ``<root>/<version>/*.json`` (and the map mask) for a generated tree; returns the folder.

    Scene names come from the devkit's split lists, train scenes from ``train`` and val scenes
    from ``val``, so ``DetectionEval(..., eval_set="val")`` evaluates exactly the val scenes.
    """
    from nuscenes.utils.splits import create_splits_scenes

    root = Path(root)
    names = create_splits_scenes()
    used = {"train": 0, "val": 0}
    tables = _Tables(seed)
    for scene in scenes:
        if scene.split not in used:
            raise ValueError(f"scene {scene.token}: split must be train or val, got {scene.split!r}")
        pool = names[scene.split]
        if used[scene.split] >= len(pool):
            raise ValueError(f"more than {len(pool)} {scene.split} scenes: the devkit's split has no more names")
        tables.add_scene(root, scene, pool[used[scene.split]])
        used[scene.split] += 1
    folder = tables.write(root, version)
    log.info("wrote nuScenes tables for %d scenes (%d annotations) to %s", len(scenes),
             len(tables.rows["sample_annotation"]), folder)  # fmt: skip
    return folder
