"""Decoded boxes -> the nuScenes detection results format.

The head decodes boxes in the lidar frame of one keyframe (:meth:`TransFusionHead.decode`):
``center`` (x, y and the *vertical centre* of the box, the gravity centre that nuScenes
wants), ``size`` as extents along the box's own x, y, z (length, width, height), ``yaw`` from
the lidar +x axis, ``velocity`` (vx, vy) in the lidar frame, ``score`` and ``label``. The
results format wants, per box, in the **global** frame:

- ``translation``: the box centre, taken through ``lidar2ego`` then ``ego2global``;
- ``size``: ``[width, length, height]`` (nuScenes' ``wlh``);
- ``rotation``: a ``[w, x, y, z]`` quaternion, the box's heading turned by the same two
  rotations;
- ``velocity``: ``[vx, vy]``, rotated likewise (a velocity has no translation part);
- ``detection_name``, ``detection_score`` and ``attribute_name``.

BEVFusion has no attribute head, so the attribute follows the convention the nuScenes
baselines use: from the class and whether the box moves (speed above 0.2 m/s). That makes
the attribute error a measure of velocity and class more than of anything else; it is the
same for FP32 and INT8, so it cannot hide a quantization loss.

The same conversion serves the ground-truth check (:func:`boxes_from_internal`): boxes from
the info files, in the package's internal form, pass through exactly the code the model's
boxes take.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bevfusion_ptq.data.geometry import matrix_to_quaternion, rot_z

#: Largest number of boxes per sample the nuScenes evaluation accepts.
MAX_BOXES_PER_SAMPLE = 500
_MOVING_MPS = 0.2
_VEHICLES = frozenset({"car", "construction_vehicle", "bus", "truck", "trailer"})
#: Attribute of a box that does not move, per class ("" where nuScenes has no attribute).
_STATIC_ATTRIBUTE: dict[str, str] = {
    "car": "vehicle.parked",
    "truck": "vehicle.parked",
    "construction_vehicle": "vehicle.parked",
    "trailer": "vehicle.parked",
    "bus": "vehicle.stopped",
    "motorcycle": "cycle.without_rider",
    "bicycle": "cycle.without_rider",
    "pedestrian": "pedestrian.standing",
    "barrier": "",
    "traffic_cone": "",
}


def attribute_name(name: str, velocity_xy: Sequence[float]) -> str:
    """nuScenes attribute for a box of class ``name`` moving at ``velocity_xy`` (m/s)."""
    moving = float(np.hypot(velocity_xy[0], velocity_xy[1])) > _MOVING_MPS
    if not moving:
        return _STATIC_ATTRIBUTE.get(name, "")
    if name in _VEHICLES:
        return "vehicle.moving"
    if name in ("motorcycle", "bicycle"):
        return "cycle.with_rider"
    if name == "pedestrian":
        return "pedestrian.moving"
    return ""


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def sample_results(
    sample_token: str,
    boxes: Mapping[str, Any],
    lidar2ego: np.ndarray,
    ego2global: np.ndarray,
    class_names: Sequence[str],
) -> list[dict[str, Any]]:
    """The results entries of one keyframe: its decoded ``boxes`` taken to the global frame.

    ``boxes`` holds ``center [K, 3]``, ``size [K, 3]`` (l, w, h), ``yaw [K]``, ``velocity
    [K, 2]``, ``score [K]`` and ``label [K]`` (tensors or arrays), as the head decodes them.
    The highest-scoring :data:`MAX_BOXES_PER_SAMPLE` are kept.
    """
    center, size = _numpy(boxes["center"]).reshape(-1, 3), _numpy(boxes["size"]).reshape(-1, 3)
    yaw, score = _numpy(boxes["yaw"]).reshape(-1), _numpy(boxes["score"]).reshape(-1)
    velocity = _numpy(boxes["velocity"]).reshape(-1, 2)
    label = _numpy(boxes["label"]).reshape(-1).astype(np.int64)
    order = np.argsort(-score, kind="stable")[:MAX_BOXES_PER_SAMPLE]
    lidar2global = np.asarray(ego2global, dtype=np.float64) @ np.asarray(lidar2ego, dtype=np.float64)
    rotation = lidar2global[:3, :3]
    translation = center @ rotation.T + lidar2global[:3, 3]
    velocity_global = np.concatenate([velocity, np.zeros((len(velocity), 1))], axis=1) @ rotation.T
    out = []
    for k in order:
        name = class_names[int(label[k])]
        vel = [float(velocity_global[k, 0]), float(velocity_global[k, 1])]
        out.append(
            {
                "sample_token": sample_token,
                "translation": [float(v) for v in translation[k]],
                "size": [float(size[k, 1]), float(size[k, 0]), float(size[k, 2])],
                "rotation": matrix_to_quaternion(rotation @ rot_z(float(yaw[k]))),
                "velocity": vel,
                "detection_name": name,
                "detection_score": float(score[k]),
                "attribute_name": attribute_name(name, vel),
            }
        )
    return out


def boxes_from_internal(
    boxes: np.ndarray, names: Sequence[str], velocity: np.ndarray, class_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Internal boxes ``[K, 7]`` (centre, l w h, yaw) in the decoded-box form, score 1.

    For the ground-truth-as-predictions check: info-file boxes of classes the model does not
    predict are left out.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    keep = np.array([n in class_names for n in names], dtype=bool)
    return {
        "center": boxes[keep, :3],
        "size": boxes[keep, 3:6],
        "yaw": boxes[keep, 6],
        "velocity": np.asarray(velocity, dtype=np.float64).reshape(-1, 2)[keep],
        "score": np.ones(int(keep.sum())),
        "label": np.array([list(class_names).index(n) for n, k in zip(names, keep) if k], dtype=np.int64),
    }


def results_document(results: Mapping[str, list[dict[str, Any]]], modality: str = "camera+lidar") -> dict[str, Any]:
    """The whole submission: ``{"meta": ..., "results": {sample_token: [boxes]}}``."""
    return {
        "meta": {
            "use_camera": "camera" in modality,
            "use_lidar": "lidar" in modality,
            "use_radar": False,
            "use_map": False,
            "use_external": False,
        },
        "results": {token: list(boxes) for token, boxes in results.items()},
    }
