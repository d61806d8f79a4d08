"""Read nuScenes info pickles (BEVFusion and mmdet3d 1.x flavours) into one record type.

Users already have the info files that the BEVFusion tooling (or mmdet3d 1.x's
``create_data.py`` / ``update_infos_to_v2.py``) produced next to their nuScenes root. Both
flavours describe the same facts with different field names and units, so we normalise each
info entry into a :class:`SampleRecord` (paths resolved against the user's data root, 4x4
matrices, timestamps in microseconds, internal boxes) and everything downstream only ever sees
that record. The loader then cannot depend on which tool wrote the file.

Fields read, BEVFusion format (``{"infos": [...], "metadata": {...}}``), per info:

- ``token`` (str), ``timestamp`` (int, microseconds), ``lidar_path`` (str);
- ``lidar2ego_translation`` (3), ``lidar2ego_rotation`` (quaternion w, x, y, z);
- ``ego2global_translation`` (3), ``ego2global_rotation`` (quaternion);
- ``sweeps``: list, newest first, each ``data_path``, ``timestamp`` (microseconds),
  ``sensor2lidar_rotation`` (3x3), ``sensor2lidar_translation`` (3)
  (``points @ R.T + t`` maps a sweep into the keyframe's lidar frame);
- ``cams``: the six cameras of :data:`~bevfusion_ptq.data.rig.CAMERA_NAMES`, each
  ``data_path``, ``cam_intrinsic`` (3x3; ``camera_intrinsics`` is accepted too, the name the
  BEVFusion converter writes), ``sensor2lidar_rotation``, ``sensor2lidar_translation``,
  ``sensor2ego_rotation`` (quaternion), ``sensor2ego_translation``;
- optional: ``gt_boxes`` ([K, 7]: box centre, ``w, l, h``, ``-yaw - pi/2``, the converter's
  "SECOND format"), ``gt_names`` ([K]), ``gt_velocity`` ([K, 2]), ``location``,
  ``scene_token`` (not written by the BEVFusion converter; our generator adds it).
- ``metadata["image_size"]`` (optional, [H, W]): the source image size the intrinsics refer to;
  nuScenes' 900x1600 when absent.

Fields read, mmdet3d 1.x format (``{"data_list": [...], "metainfo": {...}}``), per entry:

- ``token``, ``timestamp`` (float, seconds), ``ego2global`` (4x4);
- ``lidar_points``: ``lidar_path`` (file name), ``lidar2ego`` (4x4);
- ``lidar_sweeps``: each ``lidar_points.lidar_path``, ``lidar_points.lidar2sensor`` (4x4, the
  keyframe lidar -> sweep lidar transform, which we invert), ``timestamp`` (seconds);
- ``images``: the six cameras, each ``img_path`` (file name), ``cam2img`` (3x3 or 4x4),
  ``lidar2cam`` (4x4), ``cam2ego`` (4x4);
- optional: ``instances`` (``bbox_3d`` = bottom centre, ``l, w, h``, yaw; ``bbox_label_3d``,
  ``velocity``) with ``metainfo["categories"]`` naming the labels, ``scene_token``.

Paths: an info path is resolved against the data root from its last ``samples/`` or
``sweeps/`` component (BEVFusion writes ``./data/nuscenes/samples/...`` relative to its own
checkout); a bare file name (mmdet3d 1.x) goes to ``samples/<SENSOR>/`` or
``sweeps/LIDAR_TOP/`` like mmdet3d's ``data_prefix`` does.

Info files are pickles: loading one runs code it names, so only load files you trust (the
same is true of mmdet3d and BEVFusion, which load them the same way).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from bevfusion_ptq.data.geometry import invert_rigid, pose, rigid
from bevfusion_ptq.data.rig import CAMERA_NAMES, LIDAR_NAME, NUSCENES_IMAGE_SIZE
from bevfusion_ptq.errors import DatasetError
from bevfusion_ptq.hashing import file_sha256

log = logging.getLogger(__name__)

# The 10 nuScenes detection classes, in the order BEVFusion's head predicts them.
NUSCENES_CLASSES: tuple[str, ...] = (
    "car",
    "truck",
    "construction_vehicle",
    "bus",
    "trailer",
    "barrier",
    "motorcycle",
    "bicycle",
    "pedestrian",
    "traffic_cone",
)

# Keyframes of one nuScenes scene are ~0.5 s apart; when an info file carries no scene token,
# a larger gap between consecutive keyframes starts a new scene.
SCENE_GAP_S = 2.0


@dataclass(frozen=True)
class CameraRecord:
    """One camera of one keyframe, as the pipelines need it."""

    name: str
    image_path: Path
    intrinsics: np.ndarray  # [3, 3], pixels of the source image
    camera2lidar: np.ndarray  # [4, 4]
    camera2ego: np.ndarray  # [4, 4]


@dataclass(frozen=True)
class SweepRecord:
    """One earlier lidar sweep: where it is and how it maps into the keyframe's lidar frame."""

    path: Path
    sensor2lidar: np.ndarray  # [4, 4]
    timestamp_us: int


@dataclass(frozen=True)
class SampleRecord:
    """A keyframe, normalised from either info flavour; what every loader consumes."""

    token: str
    scene: str
    timestamp_us: int
    lidar_path: Path
    lidar2ego: np.ndarray  # [4, 4]
    ego2global: np.ndarray  # [4, 4]
    cameras: tuple[CameraRecord, ...]  # CAMERA_NAMES order
    sweeps: tuple[SweepRecord, ...]  # newest first
    source_image_size: tuple[int, int]  # (H, W) the intrinsics refer to
    gt_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 7), np.float32))  # internal boxes
    gt_names: tuple[str, ...] = ()
    gt_velocity: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    location: str | None = None

    def files(self, max_sweeps: int | None = None) -> list[tuple[str, Path]]:
        """(field, path) of the files this sample reads (all sweeps, or the newest ``max_sweeps``)."""
        out = [("lidar_path", self.lidar_path)]
        out += [(f"cams.{cam.name}.data_path", cam.image_path) for cam in self.cameras]
        sweeps = self.sweeps if max_sweeps is None else self.sweeps[:max_sweeps]
        out += [(f"sweeps[{i}].data_path", sweep.path) for i, sweep in enumerate(sweeps)]
        return out


class _Fields:
    """Field access that raises :class:`DatasetError` naming the file, the sample and the field."""

    def __init__(self, info_path: Path, entry: Mapping[str, Any], index: int):
        self.info_path = info_path
        self.entry = entry
        self.where = f"sample #{index}" + (f" (token {entry['token']})" if "token" in entry else "")

    def fail(self, field_name: str, problem: str) -> DatasetError:
        return DatasetError(f"{self.info_path}: {self.where}: field '{field_name}' {problem}")

    def get(self, dotted: str, *, optional: bool = False) -> Any:
        value: Any = self.entry
        walked: list[str] = []
        for part in dotted.split("."):
            walked.append(part)
            if isinstance(value, Mapping) and part in value:
                value = value[part]
            elif (
                isinstance(value, Sequence) and not isinstance(value, str) and part.isdigit() and int(part) < len(value)
            ):
                value = value[int(part)]
            else:
                if optional:
                    return None
                raise self.fail(".".join(walked), "is absent")
        return value

    def array(self, dotted: str, shape: tuple[int, ...], value: Any = None) -> np.ndarray:
        raw = self.get(dotted) if value is None else value
        try:
            arr = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise self.fail(dotted, f"is not numeric ({exc})") from None
        if arr.shape != shape:
            # mmdet3d 1.x may store cam2img as 4x4; accept a larger matrix whose corner we need.
            if len(shape) == 2 and arr.ndim == 2 and arr.shape[0] >= shape[0] and arr.shape[1] >= shape[1]:
                arr = arr[: shape[0], : shape[1]]
            else:
                raise self.fail(dotted, f"has shape {arr.shape}, expected {shape}")
        if not np.all(np.isfinite(arr)):
            raise self.fail(dotted, "contains non-finite values")
        return arr


def resolve_data_path(path: str, data_root: Path, default_dir: str) -> Path:
    """Map a path stored in an info file onto the user's data root (see module docstring)."""
    parts = PurePosixPath(str(path).replace("\\", "/")).parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("samples", "sweeps"):
            return data_root.joinpath(*parts[i:])
    if len(parts) == 1:
        return data_root / default_dir / parts[0]
    return data_root.joinpath(*[p for p in parts if p not in ("", ".")])


@dataclass
class InfoFile:
    """A loaded info pickle: its identity (sha256), flavour, and entries sorted by time.

    Entries stay raw until :meth:`record` normalises one; a full nuScenes train file has ~28k
    infos and calibration needs a few hundred, so we do not normalise what we will not load.
    """

    path: Path
    sha256: str
    flavour: str  # "bevfusion" or "mmdet3d-v2"
    metadata: dict[str, Any]
    entries: list[Mapping[str, Any]]
    categories: tuple[str, ...] = NUSCENES_CLASSES

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def source_image_size(self) -> tuple[int, int]:
        size = self.metadata.get("image_size")
        if size is None:
            return NUSCENES_IMAGE_SIZE
        return (int(size[0]), int(size[1]))

    def token(self, index: int) -> str:
        return str(_Fields(self.path, self.entries[index], index).get("token"))

    def timestamp_us(self, index: int) -> int:
        return _timestamp_us(self.entries[index], self.flavour, _Fields(self.path, self.entries[index], index))

    def scenes(self) -> list[str]:
        """A scene key per entry: ``scene_token`` where every entry has one, else time gaps.

        BEVFusion's info files carry no scene token; its keyframes are in time order, 0.5 s
        apart within a scene, so a gap over :data:`SCENE_GAP_S` starts the next scene.
        """
        tokens = [entry.get("scene_token") for entry in self.entries]
        if tokens and all(isinstance(t, str) and t for t in tokens):
            return [str(t) for t in tokens]
        keys: list[str] = []
        scene = -1
        previous: int | None = None
        for i in range(len(self.entries)):
            now = self.timestamp_us(i)
            if previous is None or (now - previous) / 1e6 > SCENE_GAP_S:
                scene += 1
            keys.append(f"scene-{scene:04d}")
            previous = now
        return keys

    def record(self, index: int, data_root: str | Path, scene: str = "") -> SampleRecord:
        """Normalise entry ``index`` into a :class:`SampleRecord`, resolving paths on ``data_root``."""
        entry = self.entries[index]
        fields = _Fields(self.path, entry, index)
        root = Path(data_root)
        if self.flavour == "bevfusion":
            return _record_from_bevfusion(fields, root, scene, self.source_image_size)
        return _record_from_mmdet3d_v2(fields, root, scene, self.source_image_size, self.categories)


def read_info_file(path: str | Path) -> InfoFile:
    """Load and identify an info pickle; raises :class:`DatasetError` on anything unusable."""
    info_path = Path(path)
    if not info_path.is_file():
        raise DatasetError(f"info file not found: {info_path}")
    try:
        with open(info_path, "rb") as fh:
            payload = pickle.load(fh)
    except ModuleNotFoundError as exc:
        raise DatasetError(
            f"{info_path}: cannot unpickle ({exc}); a file written with numpy 2 needs numpy 2 to read"
            if "numpy._core" in str(exc)
            else f"{info_path}: cannot unpickle ({exc})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise DatasetError(f"{info_path}: not a readable info pickle ({type(exc).__name__}: {exc})") from None

    if isinstance(payload, Mapping) and "infos" in payload:
        flavour, entries, metadata = "bevfusion", payload["infos"], dict(payload.get("metadata") or {})
        categories = NUSCENES_CLASSES
    elif isinstance(payload, Mapping) and "data_list" in payload:
        flavour, entries, metadata = "mmdet3d-v2", payload["data_list"], dict(payload.get("metainfo") or {})
        cats = metadata.get("categories")
        categories = tuple(sorted(cats, key=cats.get)) if isinstance(cats, Mapping) else NUSCENES_CLASSES
    else:
        found = sorted(payload) if isinstance(payload, Mapping) else type(payload).__name__
        raise DatasetError(
            f"{info_path}: field 'infos' (BEVFusion) or 'data_list' (mmdet3d 1.x) is absent; found {found}"
        )
    if not isinstance(entries, list):
        raise DatasetError(f"{info_path}: field '{'infos' if flavour == 'bevfusion' else 'data_list'}' is not a list")

    info = InfoFile(info_path, file_sha256(info_path), flavour, metadata, entries, categories)
    # The reference sorts by timestamp; sampling and scene grouping rely on time order too.
    order = sorted(range(len(entries)), key=info.timestamp_us)
    info.entries = [entries[i] for i in order]
    log.info("read %d %s infos from %s", len(entries), flavour, info_path)
    return info


def _timestamp_us(entry: Mapping[str, Any], flavour: str, fields: _Fields) -> int:
    raw = fields.get("timestamp")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise fields.fail("timestamp", f"is not a number: {raw!r}") from None
    # BEVFusion stores microseconds; mmdet3d 1.x divided them by 1e6.
    return int(round(value * 1e6)) if flavour == "mmdet3d-v2" else int(round(value))


def _record_from_bevfusion(f: _Fields, root: Path, scene: str, image_size: tuple[int, int]) -> SampleRecord:
    lidar2ego = pose(f.array("lidar2ego_rotation", (4,)), f.array("lidar2ego_translation", (3,)))
    ego2global = pose(f.array("ego2global_rotation", (4,)), f.array("ego2global_translation", (3,)))
    cams = f.get("cams")
    if not isinstance(cams, Mapping):
        raise f.fail("cams", "is not a mapping of camera name to camera info")
    cameras = []
    for name in CAMERA_NAMES:
        if name not in cams:
            raise f.fail(f"cams.{name}", f"is absent (cameras present: {sorted(cams)})")
        key = f"cams.{name}"
        intrinsic_key = (
            f"{key}.cam_intrinsic"
            if f.get(f"{key}.cam_intrinsic", optional=True) is not None
            else f"{key}.camera_intrinsics"
        )
        cameras.append(
            CameraRecord(
                name=name,
                image_path=resolve_data_path(f.get(f"{key}.data_path"), root, f"samples/{name}"),
                intrinsics=f.array(intrinsic_key, (3, 3)),
                camera2lidar=rigid(
                    f.array(f"{key}.sensor2lidar_rotation", (3, 3)), f.array(f"{key}.sensor2lidar_translation", (3,))
                ),
                camera2ego=pose(
                    f.array(f"{key}.sensor2ego_rotation", (4,)), f.array(f"{key}.sensor2ego_translation", (3,))
                ),
            )
        )
    sweeps_raw = f.get("sweeps")
    if not isinstance(sweeps_raw, Sequence):
        raise f.fail("sweeps", "is not a list")
    sweeps = []
    for i in range(len(sweeps_raw)):
        key = f"sweeps.{i}"
        ts = f.get(f"{key}.timestamp")
        sweeps.append(
            SweepRecord(
                path=resolve_data_path(f.get(f"{key}.data_path"), root, f"sweeps/{LIDAR_NAME}"),
                sensor2lidar=rigid(
                    f.array(f"{key}.sensor2lidar_rotation", (3, 3)), f.array(f"{key}.sensor2lidar_translation", (3,))
                ),
                timestamp_us=int(round(float(ts))),
            )
        )
    boxes, names, velocity = _bevfusion_boxes(f)
    return SampleRecord(
        token=str(f.get("token")),
        scene=scene,
        timestamp_us=_timestamp_us(f.entry, "bevfusion", f),
        lidar_path=resolve_data_path(f.get("lidar_path"), root, f"samples/{LIDAR_NAME}"),
        lidar2ego=lidar2ego,
        ego2global=ego2global,
        cameras=tuple(cameras),
        sweeps=tuple(sweeps),
        source_image_size=image_size,
        gt_boxes=boxes,
        gt_names=names,
        gt_velocity=velocity,
        location=f.get("location", optional=True),
    )


def _bevfusion_boxes(f: _Fields) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
    """Converter boxes (centre, w l h, -yaw - pi/2) -> internal boxes (centre, l w h, yaw)."""
    raw = f.get("gt_boxes", optional=True)
    if raw is None:
        return np.zeros((0, 7), np.float32), (), np.zeros((0, 2), np.float32)
    boxes = np.asarray(raw, dtype=np.float64).reshape(-1, 7) if np.size(raw) else np.zeros((0, 7))
    names = tuple(str(n) for n in f.get("gt_names"))
    if len(names) != len(boxes):
        raise f.fail("gt_names", f"has {len(names)} names for {len(boxes)} gt_boxes")
    internal = np.concatenate([boxes[:, :3], boxes[:, [4, 3, 5]], -boxes[:, 6:7] - np.pi / 2], axis=1)
    vel_raw = f.get("gt_velocity", optional=True)
    velocity = (
        np.nan_to_num(np.asarray(vel_raw, dtype=np.float64).reshape(-1, 2))
        if vel_raw is not None
        else np.zeros((len(boxes), 2))
    )
    return internal.astype(np.float32), names, velocity.astype(np.float32)


def _record_from_mmdet3d_v2(
    f: _Fields, root: Path, scene: str, image_size: tuple[int, int], categories: tuple[str, ...]
) -> SampleRecord:
    lidar2ego = f.array("lidar_points.lidar2ego", (4, 4))
    ego2global = f.array("ego2global", (4, 4))
    images = f.get("images")
    if not isinstance(images, Mapping):
        raise f.fail("images", "is not a mapping of camera name to image info")
    cameras = []
    for name in CAMERA_NAMES:
        if name not in images:
            raise f.fail(f"images.{name}", f"is absent (cameras present: {sorted(images)})")
        key = f"images.{name}"
        cameras.append(
            CameraRecord(
                name=name,
                image_path=resolve_data_path(f.get(f"{key}.img_path"), root, f"samples/{name}"),
                intrinsics=f.array(f"{key}.cam2img", (3, 3)),
                camera2lidar=invert_rigid(f.array(f"{key}.lidar2cam", (4, 4))),
                camera2ego=f.array(f"{key}.cam2ego", (4, 4)),
            )
        )
    sweeps = []
    for i in range(len(f.get("lidar_sweeps", optional=True) or [])):
        key = f"lidar_sweeps.{i}"
        sweep_path = str(f.get(f"{key}.lidar_points.lidar_path"))
        # mmdet3d maps a sweep that is an earlier keyframe to samples/, the rest to sweeps/.
        default_dir = f"samples/{LIDAR_NAME}" if "samples" in sweep_path else f"sweeps/{LIDAR_NAME}"
        sweeps.append(
            SweepRecord(
                path=resolve_data_path(PurePosixPath(sweep_path).name, root, default_dir),
                sensor2lidar=invert_rigid(f.array(f"{key}.lidar_points.lidar2sensor", (4, 4))),
                timestamp_us=int(round(float(f.get(f"{key}.timestamp")) * 1e6)),
            )
        )
    boxes, names, velocity = _mmdet3d_v2_boxes(f, categories)
    return SampleRecord(
        token=str(f.get("token")),
        scene=scene,
        timestamp_us=_timestamp_us(f.entry, "mmdet3d-v2", f),
        lidar_path=resolve_data_path(f.get("lidar_points.lidar_path"), root, f"samples/{LIDAR_NAME}"),
        lidar2ego=lidar2ego,
        ego2global=ego2global,
        cameras=tuple(cameras),
        sweeps=tuple(sweeps),
        source_image_size=image_size,
        gt_boxes=boxes,
        gt_names=names,
        gt_velocity=velocity,
        location=f.get("location", optional=True),
    )


def _mmdet3d_v2_boxes(f: _Fields, categories: tuple[str, ...]) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
    """mmdet3d 1.x instances (bottom centre, l w h, yaw) -> internal boxes (volume centre)."""
    instances = f.get("instances", optional=True) or []
    if not instances:
        return np.zeros((0, 7), np.float32), (), np.zeros((0, 2), np.float32)
    boxes = np.asarray([inst["bbox_3d"] for inst in instances], dtype=np.float64).reshape(-1, 7)
    boxes[:, 2] += boxes[:, 5] / 2
    labels = [int(inst.get("bbox_label_3d", -1)) for inst in instances]
    names = tuple(categories[i] if 0 <= i < len(categories) else "ignore" for i in labels)
    velocity = np.nan_to_num(np.asarray([inst.get("velocity", [0.0, 0.0]) for inst in instances], dtype=np.float64))
    return boxes.astype(np.float32), names, velocity.reshape(-1, 2).astype(np.float32)
