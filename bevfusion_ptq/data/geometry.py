"""Small rigid-transform helpers shared by the reader, the pipelines and the generator.

Conventions (nuScenes):
- quaternions are ``[w, x, y, z]`` and rotate a vector from the sensor frame into the parent
  frame (sensor2ego, ego2global);
- a 4x4 ``a2b`` matrix maps homogeneous points of frame ``a`` into frame ``b``;
- boxes inside this package ("internal boxes") are ``[x, y, z, l, w, h, yaw]``: the box's
  centre (of its volume), its length along its heading, width, height, and the heading's
  angle from the frame's +x axis towards +y. This is what mmdet3d 1.x calls
  ``gravity_center``, ``dims`` and ``yaw`` of a ``LiDARInstance3DBoxes``.

We avoid pyquaternion here: it is one more import in every loader worker for two lines of
algebra.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def quaternion_to_matrix(q: Sequence[float]) -> np.ndarray:
    """3x3 rotation of a unit quaternion ``[w, x, y, z]`` (normalised first, as nuScenes' are
    stored with ~1e-8 error)."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(np.asarray(q, dtype=np.float64))
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quaternion(rot: np.ndarray) -> list[float]:
    """Unit quaternion ``[w, x, y, z]`` (w >= 0) of a 3x3 rotation; the generator writes these."""
    m = np.asarray(rot, dtype=np.float64)
    trace = np.trace(m)
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    quat = np.asarray(q)
    quat /= np.linalg.norm(quat)
    if quat[0] < 0:
        quat = -quat
    return [float(v) for v in quat]


def rigid(rotation: np.ndarray, translation: Sequence[float]) -> np.ndarray:
    """4x4 transform from a 3x3 rotation and a translation."""
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = np.asarray(translation, dtype=np.float64).reshape(3)
    return out


def pose(quaternion: Sequence[float], translation: Sequence[float]) -> np.ndarray:
    """4x4 transform of a nuScenes (rotation quaternion, translation) pair."""
    return rigid(quaternion_to_matrix(quaternion), translation)


def invert_rigid(transform: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 (R^T, -R^T t): exact, no general matrix inverse."""
    rot = transform[:3, :3]
    out = np.eye(4)
    out[:3, :3] = rot.T
    out[:3, 3] = -rot.T @ transform[:3, 3]
    return out


def rot_z(angle: float) -> np.ndarray:
    """3x3 rotation about +z by ``angle`` radians (counter-clockwise seen from above)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def transform_points(transform: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Apply a 4x4 (or 3x4) transform to ``[..., 3]`` points."""
    return xyz @ transform[:3, :3].T + transform[:3, 3]


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """The 8 corners ``[K, 8, 3]`` of internal boxes ``[K, 7]`` (see module docstring).

    Corner order: bottom face then top face, each counter-clockwise from (-l/2, -w/2); the
    faces in :data:`BOX_FACES` index this order.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    unit = (
        np.array(
            [[-1, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1], [-1, -1, 1], [1, -1, 1], [1, 1, 1], [-1, 1, 1]],
            dtype=np.float64,
        )
        * 0.5
    )
    local = unit[None] * boxes[:, None, 3:6]  # [K, 8, 3]
    cos, sin = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    x = local[..., 0] * cos[:, None] - local[..., 1] * sin[:, None]
    y = local[..., 0] * sin[:, None] + local[..., 1] * cos[:, None]
    return np.stack([x, y, local[..., 2]], axis=-1) + boxes[:, None, :3]


# Faces of box_corners' corner order, each listed counter-clockwise seen from outside.
BOX_FACES: tuple[tuple[int, int, int, int], ...] = (
    (0, 3, 2, 1),  # bottom
    (4, 5, 6, 7),  # top
    (0, 1, 5, 4),  # right side (-w/2)
    (2, 3, 7, 6),  # left side (+w/2)
    (1, 2, 6, 5),  # front (+l/2)
    (3, 0, 4, 7),  # back (-l/2)
)


def points_in_boxes(xyz: np.ndarray, boxes: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Boolean ``[P, K]``: point inside internal box k, grown by ``margin`` on every side."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    rel = xyz[:, None, :3] - boxes[None, :, :3]
    cos, sin = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    lx = rel[..., 0] * cos + rel[..., 1] * sin
    ly = -rel[..., 0] * sin + rel[..., 1] * cos
    half = boxes[None, :, 3:6] / 2 + margin
    return (np.abs(lx) <= half[..., 0]) & (np.abs(ly) <= half[..., 1]) & (np.abs(rel[..., 2]) <= half[..., 2])
