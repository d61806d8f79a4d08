"""The nuScenes sensor rig: camera order and a plausible default calibration.

The camera order is the one the BEVFusion info converter writes and the reference iterates;
the model sees cameras in this order, so it is part of the batch contract.

The default calibration (used by the generator and by :func:`bevfusion_ptq.data.batch.random_batch`)
imitates nuScenes' car: LIDAR_TOP 1.84 m above the ground near the rear axle, its +y axis
pointing forward; six cameras about 1.5 m up looking outward. The numbers are close to the
published nuScenes calibration, rounded; they are not copied from any file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevfusion_ptq.data.geometry import rigid, rot_z

CAMERA_NAMES: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)
LIDAR_NAME = "LIDAR_TOP"
# nuScenes camera images are 1600 wide, 900 high; intrinsics in info files refer to this size.
NUSCENES_IMAGE_SIZE: tuple[int, int] = (900, 1600)

# Camera axes (x right, y down, z forward) expressed in the ego frame (x forward, y left, z up)
# for a camera looking straight ahead; a camera's yaw turns this about the ego z axis.
_CAMERA_AXES_IN_EGO = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


@dataclass(frozen=True)
class CameraMount:
    """Where a camera sits on the car and how it images (for a 1600x900 sensor)."""

    name: str
    yaw_deg: float  # optical axis heading in the ego frame, counter-clockwise from forward
    position: tuple[float, float, float]  # ego frame, metres
    focal: float  # pixels
    principal: tuple[float, float]  # (cx, cy) pixels

    def camera2ego(self) -> np.ndarray:
        """4x4 camera -> ego transform."""
        return rigid(rot_z(np.deg2rad(self.yaw_deg)) @ _CAMERA_AXES_IN_EGO, self.position)

    def intrinsics(self, scale: float = 1.0) -> np.ndarray:
        """3x3 pinhole matrix; ``scale`` adapts it to an image resized by that factor."""
        cx, cy = self.principal
        return np.array([[self.focal * scale, 0.0, cx * scale], [0.0, self.focal * scale, cy * scale], [0.0, 0.0, 1.0]])


DEFAULT_CAMERAS: tuple[CameraMount, ...] = (
    CameraMount("CAM_FRONT", 0.0, (1.70, 0.01, 1.51), 1266.0, (816.0, 492.0)),
    CameraMount("CAM_FRONT_RIGHT", -55.0, (1.55, -0.49, 1.50), 1260.0, (807.0, 495.0)),
    CameraMount("CAM_FRONT_LEFT", 55.0, (1.52, 0.49, 1.51), 1257.0, (827.0, 450.0)),
    CameraMount("CAM_BACK", 180.0, (0.03, 0.00, 1.57), 810.0, (829.0, 482.0)),
    CameraMount("CAM_BACK_LEFT", 110.0, (1.04, 0.48, 1.56), 1256.0, (818.0, 451.0)),
    CameraMount("CAM_BACK_RIGHT", -110.0, (1.03, -0.48, 1.59), 1259.0, (799.0, 488.0)),
)
assert tuple(c.name for c in DEFAULT_CAMERAS) == CAMERA_NAMES

# LIDAR_TOP: +y forward, +x right, so lidar -> ego is a -90 degree yaw.
DEFAULT_LIDAR2EGO: np.ndarray = rigid(rot_z(-np.pi / 2), (0.94, 0.0, 1.84))
