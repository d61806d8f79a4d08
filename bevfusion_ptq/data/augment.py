"""Image and lidar augmentations of the reference, with the matrices the model undoes.

BEVFusion's ``ImageAug3D``, ``GlobalRotScaleTrans`` (with its ``lidar_aug_matrix``) and
``RandomFlip3D`` live in mmdet3d 1.4's ``projects/BEVFusion``, which the installed package
does not ship; mmdet3d's own ``GlobalRotScaleTrans`` records no ``lidar_aug_matrix`` and needs
its box and point structures. We implement the same operations on numpy arrays and PIL
images, and keep their parameters explicit so the matrices can be checked against the pixels.

Image (per camera), in the reference's order: resize by ``r``, crop a ``(H, W)`` window, flip
left-right, rotate by ``a`` degrees about the window centre. Test: ``r = test_resize``, the
crop bottom-aligned vertically and centred horizontally, no flip, no rotation. Train-aug:
``r ~ U(resize_lim)``, crop top ``~ (1 - U(bot_pct_lim)) * rH - H``, crop left ``~ U(0, rW - W)``,
flip with probability 1/2 when ``rand_flip``, ``a ~ U(rot_lim)``. ``img_aug_matrix`` maps
source pixels (u, v) to output pixels: ``[:2, :2]`` the linear part, ``[:2, 3]`` the shift.

Lidar (train-aug only): rotation ``theta ~ U(global_rot)`` about z, translation
``t ~ N(0, global_translate_std)`` per axis, scale ``s ~ U(global_scale)``, applied as
``p -> s (R p + t)``; then flips of y (probability 1/2) and of x (probability 1/2) when
``bev_flip``. ``lidar_aug_matrix`` is that whole map, so ``p_aug = M[:3, :3] p + M[:3, 3]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from bevfusion_ptq.data.geometry import rot_z
from bevfusion_ptq.data.settings import DataSettings


@dataclass(frozen=True)
class ImageAug:
    """One camera's image transform; ``crop`` is (left, top, right, bottom) in resized pixels."""

    resize: float
    resize_dims: tuple[int, int]  # (W, H) after resizing
    crop: tuple[int, int, int, int]
    flip: bool
    rotate_deg: float

    def matrix(self) -> np.ndarray:
        """4x4 ``img_aug_matrix``: source pixel -> output pixel (continuous coordinates)."""
        lin = np.eye(2) * self.resize
        shift = -np.asarray(self.crop[:2], dtype=np.float64)
        width, height = self.crop[2] - self.crop[0], self.crop[3] - self.crop[1]
        if self.flip:
            mirror = np.array([[-1.0, 0.0], [0.0, 1.0]])
            lin = mirror @ lin
            shift = mirror @ shift + np.array([width, 0.0])
        if self.rotate_deg:
            # PIL's rotate turns the picture counter-clockwise as displayed (y down).
            h = np.deg2rad(self.rotate_deg)
            rot = np.array([[np.cos(h), np.sin(h)], [-np.sin(h), np.cos(h)]])
            centre = np.array([width, height]) / 2.0
            lin = rot @ lin
            shift = rot @ shift + centre - rot @ centre
        out = np.eye(4)
        out[:2, :2] = lin
        out[:2, 3] = shift
        return out

    def apply(self, image: Image.Image) -> Image.Image:
        """Transform a PIL image the way :meth:`matrix` says."""
        left, top, right, bottom = self.crop
        new_w, new_h = self.resize_dims
        if not self.flip and not self.rotate_deg and left >= 0 and top >= 0 and right <= new_w and bottom <= new_h:
            # Resample only the crop window: the same filter taps as resize-then-crop, less work.
            sx, sy = image.size[0] / new_w, image.size[1] / new_h
            return image.resize(
                (right - left, bottom - top), Image.BICUBIC, box=(left * sx, top * sy, right * sx, bottom * sy)
            )
        out = image.resize((new_w, new_h), Image.BICUBIC).crop(self.crop)
        if self.flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if self.rotate_deg:
            out = out.rotate(self.rotate_deg)
        return out


def _scaled_dims(width: int, height: int, resize: float) -> tuple[int, int]:
    # int() like the reference, with a hair of slack so 900 * 0.48 is 432 and not 431.
    return int(width * resize + 1e-6), int(height * resize + 1e-6)


def deterministic_image_aug(settings: DataSettings, source_hw: tuple[int, int]) -> ImageAug:
    """The deterministic test transform: resize, bottom-aligned centred crop."""
    out_h, out_w = settings.image_size
    new_w, new_h = _scaled_dims(source_hw[1], source_hw[0], settings.test_resize)
    top = new_h - out_h
    left = int(max(0, new_w - out_w) / 2)
    return ImageAug(settings.test_resize, (new_w, new_h), (left, top, left + out_w, top + out_h), False, 0.0)


def random_image_aug(settings: DataSettings, source_hw: tuple[int, int], rng: np.random.Generator) -> ImageAug:
    """A train-aug image transform drawn from the ranges in ``settings.train_aug``."""
    aug = settings.train_aug
    out_h, out_w = settings.image_size
    resize = float(rng.uniform(*aug.resize_lim))
    new_w, new_h = _scaled_dims(source_hw[1], source_hw[0], resize)
    top = int((1 - rng.uniform(*aug.bot_pct_lim)) * new_h) - out_h
    left = int(rng.uniform(0, max(0, new_w - out_w)))
    flip = bool(aug.rand_flip and rng.integers(0, 2))
    rotate = float(rng.uniform(*aug.rot_lim))
    return ImageAug(resize, (new_w, new_h), (left, top, left + out_w, top + out_h), flip, rotate)


def random_lidar_aug(settings: DataSettings, rng: np.random.Generator) -> np.ndarray:
    """A train-aug ``lidar_aug_matrix`` (4x4) drawn from the ranges in ``settings.train_aug``."""
    aug = settings.train_aug
    theta = float(rng.uniform(*aug.global_rot))
    scale = float(rng.uniform(*aug.global_scale))
    translation = rng.normal(0.0, aug.global_translate_std, size=3)
    out = np.eye(4)
    out[:3, :3] = scale * rot_z(theta)
    out[:3, 3] = scale * translation
    if aug.bev_flip:
        if rng.integers(0, 2):  # flip y ("horizontal" in mmdet3d's BEV terms)
            out = np.diag([1.0, -1.0, 1.0, 1.0]) @ out
        if rng.integers(0, 2):  # flip x ("vertical")
            out = np.diag([-1.0, 1.0, 1.0, 1.0]) @ out
    return out


def augment_boxes(boxes: np.ndarray, velocity: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move internal boxes ``[K, 7]`` and velocities ``[K, 2]`` by a ``lidar_aug_matrix``.

    The matrix is a scaled rotation, possibly with a mirror; a mirrored box's heading is the
    mirrored heading vector's angle.
    """
    if len(boxes) == 0:
        return boxes, velocity
    lin = matrix[:3, :3]
    scale = float(np.cbrt(abs(np.linalg.det(lin))))
    out = boxes.astype(np.float64).copy()
    out[:, :3] = boxes[:, :3] @ lin.T + matrix[:3, 3]
    out[:, 3:6] *= scale
    heading = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6])], axis=1) @ lin[:2, :2].T
    out[:, 6] = np.arctan2(heading[:, 1], heading[:, 0])
    vel = velocity.astype(np.float64) @ lin[:2, :2].T
    return out.astype(np.float32), vel.astype(np.float32)
