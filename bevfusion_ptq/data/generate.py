"""Generate a small tree in exactly the nuScenes layout, with BEVFusion-style info files.

We cannot ship or download nuScenes, yet the loader must be tested on the format users point
it at, and calibration needs inputs with structure (histograms of pure noise say nothing about
real activations). So each generated scene is a little world: an ego car driving along a
gently curving road with lane markings, other vehicles in the lanes, parked cars, cones and
barriers on the kerb, pedestrians on the pavement. All sensors observe that world with the
same geometry the info files record:

- ``samples/LIDAR_TOP`` and ``sweeps/LIDAR_TOP``: a 32-beam lidar (-30.7 to +10.7 degrees
  elevation, 20 Hz) ray-cast against the ground plane and the objects' boxes, written as
  float32 x, y, z, intensity, ring like nuScenes' files; keyframes every 0.5 s, 9 sweeps in
  between; the ego and the objects move between sweeps.
- ``samples/CAM_*``: six JPEGs per keyframe, sky, ground, lane dashes and the objects'
  visible faces painted by projecting their 3D corners with the recorded calibration (each
  camera at its own timestamp, as in nuScenes). Objects are flat-shaded in a colour per class
  (:data:`CLASS_COLORS`), so a test can find them again.
- ``nuscenes_infos_train.pkl`` / ``nuscenes_infos_val.pkl``: what BEVFusion's converter
  writes (see :mod:`bevfusion_ptq.data.infos`), plus ``scene_token`` per info and
  ``metadata["image_size"]``; paths are ``./data/nuscenes/...`` as the converter writes them,
  so loading them exercises the same path resolution a user's files need.
- ``v1.0-trainval/*.json`` and ``maps/``: the nuScenes database tables, written from the
  world's true object tracks (:mod:`bevfusion_ptq.data.nuscenes_tables`), so that
  nuscenes-devkit's ``NuScenes`` and ``DetectionEval`` run on the tree unchanged.

Everything derives from ``seed``; the same call writes the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from bevfusion_ptq.data.geometry import (
    BOX_FACES,
    box_corners,
    invert_rigid,
    matrix_to_quaternion,
    rigid,
    rot_z,
    transform_points,
)
from bevfusion_ptq.data.infos import NUSCENES_CLASSES
from bevfusion_ptq.data.nuscenes_tables import GeneratedScene, write_nuscenes_tables
from bevfusion_ptq.data.rig import CAMERA_NAMES, DEFAULT_CAMERAS, DEFAULT_LIDAR2EGO, LIDAR_NAME, NUSCENES_IMAGE_SIZE

log = logging.getLogger(__name__)

# Typical (length, width, height) in metres of each class, close to nuScenes' averages.
CLASS_SIZES: dict[str, tuple[float, float, float]] = {
    "car": (4.6, 1.95, 1.7),
    "truck": (6.9, 2.5, 2.8),
    "construction_vehicle": (6.4, 2.8, 3.2),
    "bus": (11.0, 2.9, 3.5),
    "trailer": (12.0, 2.9, 3.8),
    "barrier": (2.5, 0.5, 1.0),
    "motorcycle": (2.1, 0.8, 1.5),
    "bicycle": (1.8, 0.6, 1.3),
    "pedestrian": (0.7, 0.7, 1.75),
    "traffic_cone": (0.45, 0.45, 1.0),
}
# Saturated RGB per class; the background (sky, asphalt, lane paint) is nearly grey, so a
# pixel's chromaticity tells which class painted it.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "car": (215, 35, 35),
    "truck": (35, 190, 45),
    "construction_vehicle": (235, 130, 20),
    "bus": (225, 200, 25),
    "trailer": (40, 60, 220),
    "barrier": (140, 215, 30),
    "motorcycle": (25, 200, 205),
    "bicycle": (200, 40, 200),
    "pedestrian": (125, 45, 225),
    "traffic_cone": (250, 90, 160),
}
# Mean lidar intensity per class (nuScenes intensities are 0-255; paint and plastic reflect more).
CLASS_INTENSITY: dict[str, float] = {
    "car": 30.0, "truck": 25.0, "construction_vehicle": 35.0, "bus": 28.0, "trailer": 22.0,
    "barrier": 60.0, "motorcycle": 18.0, "bicycle": 12.0, "pedestrian": 8.0, "traffic_cone": 90.0,
}  # fmt: skip
_FACE_SHADE = (0.5, 1.0, 0.8, 0.7, 0.9, 0.62)  # per BOX_FACES entry: flat shading
_SKY_TOP, _SKY_HORIZON = np.array([170, 190, 210]), np.array([205, 210, 215])  # RGB, low chroma
_ASPHALT_FAR, _ASPHALT_NEAR = np.array([125, 125, 122]), np.array([92, 92, 90])
_LANE_PAINT = (225, 225, 218)
assert set(CLASS_SIZES) == set(CLASS_COLORS) == set(CLASS_INTENSITY) == set(NUSCENES_CLASSES)

KEYFRAME_US = 500_000  # nuScenes keyframes: 2 Hz
SWEEP_US = 50_000  # LIDAR_TOP: 20 Hz
_CAMERA_OFFSET_US = (8_000, 2_000, 14_000, -25_000, 20_000, -14_000)  # camera exposure vs lidar keyframe
_BEAMS = np.deg2rad(np.linspace(-30.67, 10.67, 32))
_MAX_RANGE_M = 70.0
_ANNOTATION_RANGE_M = 60.0
_LOG = "n000-2026-01-01-00-00-00+0000"  # nuScenes-style log name
_DATA_PREFIX = "./data/nuscenes"  # where BEVFusion's converter writes paths relative to


@dataclass(frozen=True)
class GeneratedDataset:
    """Where :func:`make_dataset` wrote things."""

    root: Path
    train_info: Path
    val_info: Path
    num_train: int
    num_val: int
    seconds: float


@dataclass(frozen=True)
class _Road:
    """A circular arc (curvature kappa) parametrised by arc length s; lateral is to the left."""

    origin: np.ndarray  # (2,) global xy at s = 0
    heading0: float
    kappa: float

    def heading(self, s: np.ndarray | float) -> np.ndarray:
        return self.heading0 + self.kappa * np.asarray(s, dtype=np.float64)

    def point(self, s: np.ndarray | float, lateral: np.ndarray | float = 0.0) -> np.ndarray:
        s = np.asarray(s, dtype=np.float64)
        h = self.heading(s)
        x = self.origin[0] + (np.sin(h) - np.sin(self.heading0)) / self.kappa
        y = self.origin[1] - (np.cos(h) - np.cos(self.heading0)) / self.kappa
        lat = np.asarray(lateral, dtype=np.float64)
        return np.stack([x - lat * np.sin(h), y + lat * np.cos(h)], axis=-1)


@dataclass(frozen=True)
class _Actor:
    """An object moving along the road at a constant lateral offset and speed."""

    name: str
    size: tuple[float, float, float]
    s0: float
    lateral: float
    speed: float  # m/s along the road; negative drives against s
    token: str

    def box(self, road: _Road, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Internal box [7] and velocity [2] in the global frame at scene time ``t`` seconds."""
        s = self.s0 + self.speed * t
        xy = road.point(s, self.lateral)
        heading = float(road.heading(s)) + (np.pi if self.speed < 0 else 0.0)
        length, width, height = self.size
        box = np.array([xy[0], xy[1], height / 2, length, width, height, heading])
        road_dir = np.array([np.cos(road.heading(s)), np.sin(road.heading(s))])
        return box, self.speed * road_dir


@dataclass(frozen=True)
class _Scene:
    index: int
    token: str
    start_us: int
    road: _Road
    ego_speed: float
    actors: tuple[_Actor, ...]

    def ego2global(self, t: float) -> np.ndarray:
        s = self.ego_speed * t
        xy = self.road.point(s)
        return rigid(rot_z(float(self.road.heading(s))), (xy[0], xy[1], 0.0))

    def boxes(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        if not self.actors:
            return np.zeros((0, 7)), np.zeros((0, 2))
        pairs = [a.box(self.road, t) for a in self.actors]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def make_dataset(
    out_dir: str | Path,
    scenes: int = 2,
    frames: int = 10,
    seed: int = 0,
    *,
    image_size: tuple[int, int] = NUSCENES_IMAGE_SIZE,
    val_scenes: int | None = None,
    sweeps_per_frame: int = 9,
    lidar_azimuths: int = 1084,
    jpeg_quality: int = 90,
) -> GeneratedDataset:
    """Write ``scenes`` scenes of ``frames`` keyframes under ``out_dir`` (see module docstring).

    The last ``val_scenes`` scenes (default: 1 when there are at least 2 scenes, else 0) go to
    the val info file, the others to train. ``image_size`` (H, W) other than nuScenes' 900x1600
    scales the intrinsics and is recorded in the info metadata.
    """
    if scenes < 1 or frames < 1:
        raise ValueError(f"scenes and frames must be >= 1, got scenes={scenes} frames={frames}")
    n_val = min(1, scenes - 1) if val_scenes is None else int(val_scenes)
    if not 0 <= n_val < scenes:
        raise ValueError(f"val_scenes must be in 0..{scenes - 1}, got {val_scenes}")
    started = time.perf_counter()
    root = Path(out_dir)
    for sub in [*(f"samples/{c}" for c in CAMERA_NAMES), f"samples/{LIDAR_NAME}", f"sweeps/{LIDAR_NAME}"]:
        (root / sub).mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    painter = _Painter(image_size, rng, jpeg_quality)
    lidar = _Lidar(lidar_azimuths, float(DEFAULT_LIDAR2EGO[2, 3]))
    infos: list[list[dict]] = []
    made: list[_Scene] = []
    for index in range(scenes):
        scene = _make_scene(index, frames, seed, rng)
        infos.append(_write_scene(root, scene, frames, sweeps_per_frame, painter, lidar, rng))
        made.append(scene)

    train = [info for scene_infos in infos[: scenes - n_val] for info in scene_infos]
    val = [info for scene_infos in infos[scenes - n_val :] for info in scene_infos]
    metadata = {
        "version": "v1.0-synthetic",
        "image_size": [int(image_size[0]), int(image_size[1])],
        "generator_seed": seed,
    }
    train_path, val_path = root / "nuscenes_infos_train.pkl", root / "nuscenes_infos_val.pkl"
    for path, split in ((train_path, train), (val_path, val)):
        with open(path, "wb") as fh:
            pickle.dump({"infos": split, "metadata": metadata}, fh, protocol=pickle.HIGHEST_PROTOCOL)
    write_nuscenes_tables(
        root, [_table_scene(scene, i >= scenes - n_val, scene_infos) for i, (scene, scene_infos) in enumerate(zip(made, infos))], seed
    )
    seconds = time.perf_counter() - started
    log.info("generated %d train + %d val keyframes under %s in %.1f s", len(train), len(val), root, seconds)
    return GeneratedDataset(root, train_path, val_path, len(train), len(val), seconds)


def _table_scene(scene: _Scene, val: bool, infos: list[dict]) -> GeneratedScene:
    """What the nuScenes table writer needs of a scene: its infos and its true object tracks."""
    return GeneratedScene(
        token=scene.token,
        split="val" if val else "train",
        infos=infos,
        object_tokens=[a.token for a in scene.actors],
        object_names=[a.name for a in scene.actors],
        boxes_at=lambda ts: scene.boxes((ts - scene.start_us) / 1e6),
        lidar_tokens=[_token(scene.token, LIDAR_NAME, info["timestamp"]) for info in infos],
    )


def _token(*parts: object) -> str:
    """A nuScenes-looking 32-hex token, stable for the same parts."""
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def _make_scene(index: int, frames: int, seed: int, rng: np.random.Generator) -> _Scene:
    duration = frames * KEYFRAME_US / 1e6
    ego_speed = float(rng.uniform(3.0, 8.0))
    kappa = float(rng.choice([-1, 1]) * rng.uniform(5e-4, 5e-3))
    road = _Road(rng.uniform(300.0, 2000.0, size=2), float(rng.uniform(-np.pi, np.pi)), kappa)
    travel = ego_speed * duration
    actors: list[_Actor] = []

    def add(name: str, s0: float, lateral: float, speed: float) -> None:
        length, width, height = CLASS_SIZES[name]
        jitter = rng.uniform(0.9, 1.1, size=3)
        size = (length * jitter[0], width * jitter[1], height * jitter[2])
        actors.append(_Actor(name, size, s0, lateral, speed, _token(seed, "instance", index, len(actors))))

    # Traffic: each lane slot at most once, so moving vehicles never meet.
    vehicles = ["car", "car", "car", "truck", "bus", "trailer", "construction_vehicle", "motorcycle", "bicycle"]
    slots = rng.permutation(4)[: int(rng.integers(2, 5))]
    for slot in slots:
        if slot == 0:  # ahead in the ego lane
            add("car", float(rng.uniform(14, 30)), 0.0, ego_speed + float(rng.uniform(-0.2, 0.2)))
        elif slot == 1:  # behind in the ego lane
            add(
                str(rng.choice(["car", "motorcycle"])),
                float(rng.uniform(-30, -14)),
                0.0,
                ego_speed + float(rng.uniform(-0.2, 0.2)),
            )
        else:  # the lane to the left or right
            lateral = 3.5 if slot == 2 else -3.5
            add(
                str(rng.choice(vehicles)),
                float(rng.uniform(-20, 35)),
                lateral,
                ego_speed + float(rng.uniform(-1.5, 1.5)),
            )
    # Kerb: parked cars, cones, barriers; spaced along s so they never overlap.
    kerb: dict[float, list[tuple[float, float]]] = {1.0: [], -1.0: []}
    for _ in range(int(rng.integers(3, 6))):
        name = str(rng.choice(["traffic_cone", "barrier", "car", "traffic_cone", "barrier"]))
        side = float(rng.choice([-1.0, 1.0]))
        half = CLASS_SIZES[name][0] * 0.55 + 0.5
        for _attempt in range(20):
            s0 = float(rng.uniform(-15, travel + 35))
            if all(abs(s0 - s) > half + h for s, h in kerb[side]):
                kerb[side].append((s0, half))
                add(name, s0, side * float(rng.uniform(6.2, 6.6)), 0.0)
                break
    # Pavement: pedestrians, each on its own line so they never meet.
    for lateral in rng.permutation([8.5, -8.5, 10.0, -10.0, 11.5, -11.5])[: int(rng.integers(1, 4))]:
        add(
            "pedestrian",
            float(rng.uniform(-10, travel + 25)),
            float(lateral),
            float(rng.choice([-1, 1]) * rng.uniform(0.8, 1.6)),
        )

    # Scenes 30 s apart at least, like separate nuScenes scenes (and unlike keyframes, 0.5 s).
    start = 1_533_000_000_000_000 + seed * 10_000_000_000 + index * (frames * KEYFRAME_US + 30_000_000)
    return _Scene(index, _token(seed, "scene", index), start, road, ego_speed, tuple(actors))


class _Lidar:
    """A spinning 32-beam lidar, ray-cast against the ground plane and boxes."""

    def __init__(self, azimuths: int, height: float):
        self.azimuths = azimuths
        az = np.linspace(0, 2 * np.pi, azimuths, endpoint=False)
        el, az = np.meshgrid(_BEAMS, az, indexing="ij")
        self.dirs = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)
        self.ring = np.repeat(np.arange(len(_BEAMS), dtype=np.float32), azimuths)
        # The world is flat and the car level, so where a ray meets the ground depends only on
        # the ray: computed once, not per sweep.
        with np.errstate(divide="ignore"):
            self.t_ground = np.where(self.dirs[:, 2] < -1e-6, -height / self.dirs[:, 2], np.inf)

    def _rays_towards(self, corners_lidar: np.ndarray) -> np.ndarray:
        """Indices of the rays whose direction falls in a box's angular bounding window.

        Testing every ray against every box costs ~10 ms a box a sweep; a box covers a few
        degrees, so restricting the test to its window makes generation ~20x faster.
        """
        azimuth = np.arctan2(corners_lidar[:, 1], corners_lidar[:, 0])
        centre = np.arctan2(corners_lidar[:, 1].mean(), corners_lidar[:, 0].mean())
        rel = (azimuth - centre + np.pi) % (2 * np.pi) - np.pi
        step = 2 * np.pi / self.azimuths
        first = int(np.floor((centre + rel.min()) / step)) - 1
        last = int(np.ceil((centre + rel.max()) / step)) + 1
        az_idx = np.arange(first, last + 1) % self.azimuths
        elevation = np.arctan2(corners_lidar[:, 2], np.linalg.norm(corners_lidar[:, :2], axis=1))
        beams = np.nonzero((_BEAMS >= elevation.min() - 0.01) & (_BEAMS <= elevation.max() + 0.01))[0]
        return (beams[:, None] * self.azimuths + az_idx[None, :]).reshape(-1)

    def scan(
        self, lidar2global: np.ndarray, boxes: np.ndarray, names: list[str], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Points [P, 5] (lidar frame: x y z intensity ring) and the box index each hit (-1: ground)."""
        origin, rot = lidar2global[:3, 3], lidar2global[:3, :3]
        t_hit = self.t_ground.copy()
        hit = np.full(len(t_hit), -1)
        near = (
            np.linalg.norm(boxes[:, :2] - origin[:2], axis=1) < _MAX_RANGE_M + 10 if len(boxes) else np.zeros(0, bool)
        )
        global2lidar = invert_rigid(lidar2global)
        for k in np.nonzero(near)[0]:
            rays = self._rays_towards(transform_points(global2lidar, box_corners(boxes[k : k + 1])[0]))
            if not len(rays):
                continue
            t_box = _ray_box(origin, self.dirs[rays] @ rot.T, boxes[k])
            closer = t_box < t_hit[rays]
            t_hit[rays[closer]] = t_box[closer]
            hit[rays[closer]] = k
        keep = (t_hit < _MAX_RANGE_M) & (t_hit > 1.0)
        exact = self.dirs[keep] * t_hit[keep][:, None]
        hit = hit[keep]
        ground_xy = exact[:, :2] @ rot[:2, :2].T + origin[:2]  # the car is level: xy of the hit in the world
        intensity = 6.0 + 4.0 * np.sin(0.7 * ground_xy[:, 0]) * np.cos(0.45 * ground_xy[:, 1])
        for k in np.unique(hit[hit >= 0]):
            intensity[hit == k] = CLASS_INTENSITY[names[k]]
        noise = rng.standard_normal(size=(len(hit), 2), dtype=np.float32)
        intensity = np.clip(intensity + 2.0 * noise[:, 0], 0.0, 255.0)
        xyz = exact + self.dirs[keep] * (0.01 * noise[:, 1:2])  # 1 cm range noise
        points = np.concatenate([xyz, intensity[:, None], self.ring[keep][:, None]], axis=1).astype(np.float32)
        return points, hit


def _ray_box(origin: np.ndarray, dirs: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Distance along each ray to an internal box (slab test in the box frame), inf on a miss."""
    rot = rot_z(-box[6])
    o = rot @ (origin - box[:3])
    d = dirs @ rot.T
    d = np.where(np.abs(d) < 1e-12, 1e-12, d)
    half = box[3:6] / 2
    t1, t2 = (-half - o) / d, (half - o) / d
    t_near = np.minimum(t1, t2).max(axis=1)
    t_far = np.maximum(t1, t2).min(axis=1)
    return np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)


class _Painter:
    """Paints camera images: a static sky/asphalt background per camera, then the world."""

    def __init__(self, image_size: tuple[int, int], rng: np.random.Generator, jpeg_quality: int):
        self.h, self.w = int(image_size[0]), int(image_size[1])
        self.sx, self.sy = self.w / NUSCENES_IMAGE_SIZE[1], self.h / NUSCENES_IMAGE_SIZE[0]
        self.quality = jpeg_quality
        self.edge = max(1, round(2 * self.sx))
        texture = rng.standard_normal(size=(self.h, self.w, 1), dtype=np.float32) * 5.0
        self.backgrounds = [self._background(mount.intrinsics(), texture) for mount in DEFAULT_CAMERAS]

    def intrinsics(self, base: np.ndarray) -> np.ndarray:
        k = base.copy()
        k[0] *= self.sx
        k[1] *= self.sy
        return k

    def _background(self, k_full: np.ndarray, texture: np.ndarray) -> np.ndarray:
        """Level camera: the horizon is the row through the principal point."""
        horizon = k_full[1, 2] * self.sy
        rows = np.arange(self.h, dtype=np.float32)[:, None]
        sky_t = np.clip(rows / max(horizon, 1.0), 0, 1)
        ground_t = np.clip((rows - horizon) / max(self.h - horizon, 1.0), 0, 1)
        sky = _SKY_TOP * (1 - sky_t) + _SKY_HORIZON * sky_t
        ground = _ASPHALT_FAR * (1 - ground_t) + _ASPHALT_NEAR * ground_t
        column = np.where(rows < horizon, sky, ground).astype(np.float32)[:, None, ::-1]  # [H, 1, 3] BGR for cv2
        grain = texture * np.where(rows < horizon, 0.3, 1.0).astype(np.float32)[:, :, None]  # [H, W, 1]
        return cv2.convertScaleAbs(column + grain)  # saturating cast to uint8

    def paint(
        self,
        camera: int,
        global2camera: np.ndarray,
        k: np.ndarray,
        boxes: np.ndarray,
        names: list[str],
        lane_quads: list[np.ndarray],
    ) -> np.ndarray:
        image = self.backgrounds[camera].copy()
        for quad in lane_quads:
            self._fill(image, transform_points(global2camera, quad), k, _LANE_PAINT, outline=False)
        if len(boxes):
            corners = box_corners(boxes)  # [K, 8, 3] global
            cam_pos = invert_rigid(global2camera)[:3, 3]
            order = np.argsort(-np.linalg.norm(boxes[:, :3] - cam_pos, axis=1))  # far to near
            for b in order:
                colour = np.array(CLASS_COLORS[names[b]], dtype=np.float64)
                cam_corners = transform_points(global2camera, corners[b])
                if (cam_corners[:, 2] < 0.1).all():
                    continue
                centre = boxes[b, :3]
                for face, shade in zip(BOX_FACES, _FACE_SHADE, strict=True):
                    world = corners[b][list(face)]
                    face_centre = world.mean(axis=0)
                    if np.dot(face_centre - centre, face_centre - cam_pos) >= 0:
                        continue  # faces away from the camera
                    self._fill(image, cam_corners[list(face)], k, tuple(colour * shade), outline=True)
        return image

    def _fill(
        self, image: np.ndarray, cam_poly: np.ndarray, k: np.ndarray, rgb: tuple[float, ...], outline: bool
    ) -> None:
        poly = _clip_near(cam_poly, 0.1)
        if len(poly) < 3:
            return
        uv = (poly @ k.T)[:, :2] / poly[:, 2:3]
        # cv2 puts integer coordinates at pixel centres; ours have pixel centres at +0.5.
        pts = np.round(np.clip(uv - 0.5, -1e5, 1e5) * 16).astype(np.int32)
        bgr = tuple(float(c) for c in rgb[::-1])
        cv2.fillPoly(image, [pts], bgr, lineType=cv2.LINE_8, shift=4)
        if outline:
            dark = tuple(0.45 * c for c in bgr)
            cv2.polylines(image, [pts], True, dark, thickness=self.edge, lineType=cv2.LINE_8, shift=4)

    def write(self, path: Path, image: np.ndarray) -> None:
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise OSError(f"JPEG encoding failed for {path}")
        path.write_bytes(data.tobytes())


def _clip_near(poly: np.ndarray, z_near: float) -> np.ndarray:
    """Sutherland-Hodgman clip of a camera-frame polygon to z >= z_near."""
    out = []
    n = len(poly)
    for i in range(n):
        a, b = poly[i], poly[(i + 1) % n]
        a_in, b_in = a[2] >= z_near, b[2] >= z_near
        if a_in:
            out.append(a)
        if a_in != b_in:
            t = (z_near - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.asarray(out).reshape(-1, 3)


def _lane_quads(road: _Road, s_centre: float) -> list[np.ndarray]:
    """Ground quads (global, z=0) of the dashed lane lines near the ego, fixed in the world."""
    quads = []
    first = np.floor((s_centre - 30.0) / 9.0) * 9.0
    for s in np.arange(first, s_centre + 60.0, 9.0):
        for lateral in (-5.25, -1.75, 1.75, 5.25):
            a = road.point(np.array([s, s + 3.0]), lateral - 0.08)
            b = road.point(np.array([s, s + 3.0]), lateral + 0.08)
            quad = np.array([[*a[0], 0.0], [*a[1], 0.0], [*b[1], 0.0], [*b[0], 0.0]])
            quads.append(quad)
    return quads


def _sensor_entry(
    global2lidar: np.ndarray, path: str, kind: str, token: str, sensor2ego: np.ndarray, ego2global: np.ndarray, ts: int
) -> dict:
    """A camera or sweep entry as BEVFusion's converter writes it (``obtain_sensor2top``)."""
    sensor2lidar = global2lidar @ ego2global @ sensor2ego
    return {
        "data_path": path,
        "type": kind,
        "sample_data_token": token,
        "sensor2ego_translation": sensor2ego[:3, 3].tolist(),
        "sensor2ego_rotation": matrix_to_quaternion(sensor2ego[:3, :3]),
        "ego2global_translation": ego2global[:3, 3].tolist(),
        "ego2global_rotation": matrix_to_quaternion(ego2global[:3, :3]),
        "timestamp": ts,
        "sensor2lidar_rotation": sensor2lidar[:3, :3].copy(),
        "sensor2lidar_translation": sensor2lidar[:3, 3].copy(),
    }


def _scan_and_write(
    root: Path, folder: str, scene: _Scene, ts: int, lidar: _Lidar, rng: np.random.Generator
) -> tuple[str, np.ndarray]:
    """Ray-cast the lidar at time ``ts`` and write the ``.pcd.bin``; returns (info path, hit box ids)."""
    t = (ts - scene.start_us) / 1e6
    boxes, _ = scene.boxes(t)
    points, hit = lidar.scan(scene.ego2global(t) @ DEFAULT_LIDAR2EGO, boxes, [a.name for a in scene.actors], rng)
    name = f"{_LOG}__{LIDAR_NAME}__{ts}.pcd.bin"
    points.tofile(root / folder / LIDAR_NAME / name)
    return f"{_DATA_PREFIX}/{folder}/{LIDAR_NAME}/{name}", hit


def _write_scene(
    root: Path,
    scene: _Scene,
    frames: int,
    sweeps_per_frame: int,
    painter: _Painter,
    lidar: _Lidar,
    rng: np.random.Generator,
) -> list[dict]:
    """Write one scene's files; returns its info entries in time order."""
    lidar2ego = DEFAULT_LIDAR2EGO
    infos: list[dict] = []
    previous_key: tuple[str, int] | None = None  # (info path, timestamp) of the last keyframe
    for k in range(frames):
        t_us = scene.start_us + k * KEYFRAME_US
        t = (t_us - scene.start_us) / 1e6
        ego2global = scene.ego2global(t)
        global2lidar = invert_rigid(ego2global @ lidar2ego)

        # Sweeps since the previous keyframe, newest first, then that keyframe itself (as
        # nuScenes' "prev" chain gives them); the first keyframe of a scene has none.
        sweeps: list[tuple[str, int]] = []
        if previous_key is not None:
            for j in range(1, sweeps_per_frame + 1):
                ts = t_us - j * KEYFRAME_US // (sweeps_per_frame + 1)
                sweeps.append((_scan_and_write(root, "sweeps", scene, ts, lidar, rng)[0], ts))
            sweeps.append(previous_key)
        sweep_entries = [
            _sensor_entry(
                global2lidar,
                path,
                "lidar",
                _token(scene.token, LIDAR_NAME, ts),
                lidar2ego,
                scene.ego2global((ts - scene.start_us) / 1e6),
                ts,
            )
            for path, ts in sweeps
        ]
        lidar_path, hit = _scan_and_write(root, "samples", scene, t_us, lidar, rng)
        previous_key = (lidar_path, t_us)

        # Cameras, each at its own exposure time.
        cams = {}
        lanes = _lane_quads(scene.road, scene.ego_speed * t)
        names = [a.name for a in scene.actors]
        for c, mount in enumerate(DEFAULT_CAMERAS):
            ts = t_us + _CAMERA_OFFSET_US[c]
            tc = (ts - scene.start_us) / 1e6
            cam_ego2global = scene.ego2global(tc)
            cam2ego = mount.camera2ego()
            intrinsics = painter.intrinsics(mount.intrinsics())
            image = painter.paint(
                c, invert_rigid(cam_ego2global @ cam2ego), intrinsics, scene.boxes(tc)[0], names, lanes
            )
            name = f"{_LOG}__{mount.name}__{ts}.jpg"
            painter.write(root / "samples" / mount.name / name, image)
            path = f"{_DATA_PREFIX}/samples/{mount.name}/{name}"
            cams[mount.name] = _sensor_entry(
                global2lidar, path, mount.name, _token(scene.token, mount.name, ts), cam2ego, cam_ego2global, ts
            )
            cams[mount.name]["cam_intrinsic"] = intrinsics

        boxes, velocity = scene.boxes(t)
        infos.append(
            _keyframe_info(
                scene, k, t_us, lidar_path, ego2global, global2lidar, cams, sweep_entries, boxes, velocity, hit
            )
        )
    return infos


def _keyframe_info(
    scene: _Scene,
    k: int,
    t_us: int,
    lidar_path: str,
    ego2global: np.ndarray,
    global2lidar: np.ndarray,
    cams: dict,
    sweeps: list[dict],
    boxes: np.ndarray,
    velocity: np.ndarray,
    hit: np.ndarray,
) -> dict:
    """One info entry in BEVFusion's converter format (boxes: centre, w l h, -yaw - pi/2)."""
    lidar_yaw = np.arctan2(global2lidar[1, 0], global2lidar[0, 0])  # global -> lidar rotation about z
    centres = transform_points(global2lidar, boxes[:, :3]) if len(boxes) else np.zeros((0, 3))
    in_range = np.linalg.norm(centres[:, :2], axis=1) < _ANNOTATION_RANGE_M
    yaw = boxes[:, 6] + lidar_yaw
    gt = np.concatenate([centres, boxes[:, [4, 3, 5]], (-yaw - np.pi / 2)[:, None]], axis=1)[in_range]
    vel = (velocity @ global2lidar[:2, :2].T)[in_range]
    counts = np.array([(hit == i).sum() for i in np.nonzero(in_range)[0]], dtype=np.int64)
    names = [a.name for a in scene.actors]
    lidar2ego = DEFAULT_LIDAR2EGO
    return {
        "lidar_path": lidar_path,
        "token": _token(scene.token, "sample", k),
        "scene_token": scene.token,
        "sweeps": sweeps,
        "cams": cams,
        "lidar2ego_translation": lidar2ego[:3, 3].tolist(),
        "lidar2ego_rotation": matrix_to_quaternion(lidar2ego[:3, :3]),
        "ego2global_translation": ego2global[:3, 3].tolist(),
        "ego2global_rotation": matrix_to_quaternion(ego2global[:3, :3]),
        "timestamp": t_us,
        "location": "synthetic",
        "gt_boxes": gt,
        "gt_names": np.array([names[i] for i in np.nonzero(in_range)[0]]),
        "gt_velocity": vel,
        "num_lidar_pts": counts,
        "num_radar_pts": np.zeros_like(counts),
        "valid_flag": counts > 0,
    }
