"""The ``data`` section of a model config, validated once into a frozen value.

The pipelines, the fingerprint and :func:`~bevfusion_ptq.data.batch.random_batch` all read the
same few values; parsing them here means a typo in a user's config fails at start-up with the
key's name, not as a shape error deep inside a loader worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from bevfusion_ptq.errors import ConfigError

PIPELINES: tuple[str, ...] = ("test", "train-aug")


@dataclass(frozen=True)
class TrainAug:
    """Ranges of the reference's training augmentations (see the data README)."""

    resize_lim: tuple[float, float] = (0.38, 0.55)
    rot_lim: tuple[float, float] = (-5.4, 5.4)  # degrees, image rotation
    rand_flip: bool = True
    bot_pct_lim: tuple[float, float] = (0.0, 0.0)  # fraction of the image bottom cropped away
    global_rot: tuple[float, float] = (-0.785, 0.785)  # radians, about the lidar z axis
    global_scale: tuple[float, float] = (0.9, 1.1)
    global_translate_std: float = 0.5  # metres, per axis
    bev_flip: bool = True


@dataclass(frozen=True)
class DataSettings:
    """What the loaders need from ``cfg.data`` (see the shared contracts for the keys)."""

    image_size: tuple[int, int]  # (H, W) fed to the camera backbone
    point_cloud_range: tuple[float, float, float, float, float, float]
    sweeps_num: int
    load_dim: int
    use_dim: tuple[int, ...]
    img_mean: tuple[float, float, float]
    img_std: tuple[float, float, float]
    test_resize: float
    train_aug: TrainAug

    @classmethod
    def from_cfg(cls, data_cfg: Any) -> DataSettings:
        """Accept the ``data`` section (dict or mmengine ConfigDict), or a whole config holding one."""
        if isinstance(data_cfg, DataSettings):
            return data_cfg
        section = _section(data_cfg)
        try:
            h, w = (int(v) for v in section["image_size"])
            pcr = tuple(float(v) for v in section["point_cloud_range"])
            load_dim = int(section.get("load_dim", 5))
            use_raw = section.get("use_dim", load_dim)
            use_dim = tuple(range(int(use_raw))) if isinstance(use_raw, int) else tuple(int(v) for v in use_raw)
            norm = section.get("img_norm", {})
            mean = tuple(float(v) for v in norm.get("mean", (0.485, 0.456, 0.406)))
            std = tuple(float(v) for v in norm.get("std", (0.229, 0.224, 0.225)))
            aug_raw = dict(section.get("train_aug") or {})
            train_aug = TrainAug(
                **{
                    k: (tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else v)
                    for k, v in aug_raw.items()
                    if k in TrainAug.__dataclass_fields__
                }
            )
            settings = cls(
                image_size=(h, w),
                point_cloud_range=pcr,  # type: ignore[arg-type]
                sweeps_num=int(section.get("sweeps_num", 9)),
                load_dim=load_dim,
                use_dim=use_dim,
                img_mean=mean,  # type: ignore[arg-type]
                img_std=std,  # type: ignore[arg-type]
                test_resize=float(section["test_resize"]),
                train_aug=train_aug,
            )
        except KeyError as exc:
            raise ConfigError(f"data config: key {exc.args[0]!r} is missing") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"data config: invalid value ({exc})") from None
        unknown = set(aug_raw) - set(TrainAug.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"data config: unknown train_aug keys {sorted(unknown)}")
        settings.validate()
        return settings

    def validate(self) -> None:
        if len(self.point_cloud_range) != 6 or any(
            self.point_cloud_range[i] >= self.point_cloud_range[i + 3] for i in range(3)
        ):
            raise ConfigError(
                f"data config: point_cloud_range {list(self.point_cloud_range)} is not [xmin ymin zmin xmax ymax zmax]"
            )
        if self.load_dim < 5:
            raise ConfigError(
                f"data config: load_dim={self.load_dim}; nuScenes points have 5 values (x y z intensity ring)"
            )
        if not self.use_dim or max(self.use_dim) >= self.load_dim:
            raise ConfigError(f"data config: use_dim {list(self.use_dim)} must index into load_dim={self.load_dim}")
        if min(self.image_size) <= 0 or self.test_resize <= 0:
            raise ConfigError("data config: image_size and test_resize must be positive")
        if self.sweeps_num < 0:
            raise ConfigError("data config: sweeps_num must be >= 0")

    def tensor_values(self, pipeline: str) -> dict[str, Any]:
        """The values that change the tensors a pipeline yields (fingerprint input).

        voxel_size and the like are model settings: they do not change the batch, so a change
        there must not invalidate cached calibration data.
        """
        values: dict[str, Any] = {
            "image_size": list(self.image_size),
            "point_cloud_range": list(self.point_cloud_range),
            "sweeps_num": self.sweeps_num,
            "load_dim": self.load_dim,
            "use_dim": list(self.use_dim),
            "img_mean": list(self.img_mean),
            "img_std": list(self.img_std),
        }
        if pipeline == "test":
            values["test_resize"] = self.test_resize
        else:
            values["train_aug"] = asdict(self.train_aug)
        return values


def _section(cfg: Any) -> Mapping[str, Any]:
    """The ``data`` section: ``cfg.data`` when ``cfg`` is a whole config, else ``cfg`` itself."""
    inner = cfg.get("data") if isinstance(cfg, Mapping) else getattr(cfg, "data", None)
    if isinstance(inner, Mapping):
        return inner
    if isinstance(cfg, Mapping):
        return cfg
    raise ConfigError(f"data config: expected the 'data' section or a config holding one, got {type(cfg).__name__}")


def check_pipeline(name: str) -> str:
    if name not in PIPELINES:
        raise ConfigError(f"unknown data pipeline {name!r}; choose one of {list(PIPELINES)}")
    return name
