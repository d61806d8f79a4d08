"""The BEVFusion top module: camera and lidar encoders, fuser, BEV decoder, object head.

Submodule paths are the reference checkpoint's (``encoders.camera.backbone``, ...,
``heads.object``), so a checkpoint loads without renaming and quantization rules can
address modules by those paths.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from mmdet3d.registry import MODELS
from mmengine.model import BaseModule
from torch import Tensor, nn

from ..errors import ConfigError, DatasetError

#: batch keys the model reads (see the shared batch contract)
REQUIRED_BATCH_KEYS = (
    "img",
    "points",
    "camera_intrinsics",
    "camera2lidar",
    "lidar2image",
    "img_aug_matrix",
    "lidar_aug_matrix",
)


def _first(x: Tensor | Sequence[Tensor]) -> Tensor:
    """Necks return a list of maps; the model uses the first (finest) one."""
    return x if isinstance(x, Tensor) else x[0]


@MODELS.register_module()
class BEVFusion(BaseModule):
    """Camera + lidar BEV fusion detector (inference).

    Args:
        encoders: ``camera=dict(backbone, neck, vtransform)``, ``lidar=dict(voxelize,
            backbone)``: registry configs.
        fuser: registry config of the fuser (concatenates [camera, lidar]).
        decoder: ``dict(backbone, neck)`` registry configs.
        heads: ``dict(object=...)`` registry config of the detection head.
    """

    def __init__(
        self,
        encoders: Mapping[str, Mapping[str, Any]],
        fuser: Mapping[str, Any],
        decoder: Mapping[str, Any],
        heads: Mapping[str, Any],
        init_cfg: dict | list | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        camera, lidar = encoders["camera"], encoders["lidar"]
        self.encoders = nn.ModuleDict(
            {
                "camera": nn.ModuleDict(
                    {
                        "backbone": MODELS.build(camera["backbone"]),
                        "neck": MODELS.build(camera["neck"]),
                        "vtransform": MODELS.build(camera["vtransform"]),
                    }
                ),
                "lidar": nn.ModuleDict(
                    {
                        "voxelize": MODELS.build(lidar["voxelize"]),
                        "backbone": MODELS.build(lidar["backbone"]),
                    }
                ),
            }
        )
        self.fuser = MODELS.build(fuser)
        self.decoder = nn.ModuleDict(
            {"backbone": MODELS.build(decoder["backbone"]), "neck": MODELS.build(decoder["neck"])}
        )
        self.heads = nn.ModuleDict({"object": MODELS.build(heads["object"])})

    # ------------------------------------------------------------------ branches
    def extract_camera_features(self, batch: Mapping[str, Any]) -> Tensor:
        """Images ``[B, N, 3, H, W]`` -> camera BEV ``[B, C, X, Y]``."""
        img = batch["img"]
        batch_size, cams = img.shape[:2]
        camera = self.encoders["camera"]
        x = camera["backbone"](img.reshape(batch_size * cams, *img.shape[2:]))
        x = _first(camera["neck"](x))
        x = x.view(batch_size, cams, *x.shape[1:])
        return camera["vtransform"](
            x,
            batch["points"],
            batch["camera2lidar"],
            batch["camera_intrinsics"],
            batch["img_aug_matrix"],
            batch["lidar_aug_matrix"],
            batch["lidar2image"],
        )

    def extract_lidar_features(self, points: Sequence[Tensor]) -> Tensor:
        """Point clouds (list of ``[P_i, 5]``) -> lidar BEV ``[B, C*Z, X, Y]``."""
        lidar = self.encoders["lidar"]
        feats, coords, batch_size = lidar["voxelize"](points)
        return lidar["backbone"](feats, coords, batch_size)

    def extract_features(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Everything up to (not including) the head: the part that carries quantizers.

        Returns ``camera_bev``, ``lidar_bev``, ``fused_bev`` and ``decoder_out``.
        """
        missing = [k for k in REQUIRED_BATCH_KEYS if k not in batch]
        if missing:
            raise DatasetError(f"batch lacks {missing}; it has {sorted(batch)}")
        camera_bev = self.extract_camera_features(batch)
        lidar_bev = self.extract_lidar_features(batch["points"])
        if camera_bev.shape[-2:] != lidar_bev.shape[-2:]:
            raise ConfigError(
                f"camera BEV {tuple(camera_bev.shape[-2:])} and lidar BEV "
                f"{tuple(lidar_bev.shape[-2:])} differ: the config's vtransform bounds and "
                "the lidar sparse_shape do not describe the same grid"
            )
        fused = self.fuser([camera_bev, lidar_bev])
        x = self.decoder["backbone"](fused)
        decoder_out = _first(self.decoder["neck"](x))
        return {
            "camera_bev": camera_bev,
            "lidar_bev": lidar_bev,
            "fused_bev": fused,
            "decoder_out": decoder_out,
        }

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Features, the head's raw predictions (``preds``) and decoded ``boxes`` per sample."""
        out: dict[str, Any] = self.extract_features(batch)
        head = self.heads["object"]
        preds = head(out["decoder_out"])
        out["preds"] = preds
        out["boxes"] = head.decode(preds)
        return out
