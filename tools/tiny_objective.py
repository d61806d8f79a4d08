"""TransFusion's training objective for :class:`bevfusion_ptq.model.transfusion.TransFusionHead`.

Tool code (training the demo model): the library never imports it.

What each head channel learns, in the frame of the batch's ``gt_boxes`` (the augmented lidar
frame; internal boxes ``[x, y, z, l, w, h, yaw]`` = volume centre, length along the heading,
width, height, heading angle from +x towards +y, see :mod:`bevfusion_ptq.data.geometry`):

==========  ===  ============================================================================
channel     n    target (what :meth:`TransFusionHead.decode` turns back into the box)
==========  ===  ============================================================================
center      2    ``(x - pc_range[0]) / (voxel_size[0] * out_size_factor)`` and the same for y:
                 the centre in BEV cells (continuous; cell ``i`` spans ``[i, i + 1)``). The head
                 adds the query position, so the raw conv output learns the offset from it.
height      1    ``z`` of the volume centre (gravity centre), metres. mmdet3d's coder regresses
                 the same quantity; our decoder returns it as is (no bottom-centre shift), so a
                 nuScenes result's ``translation`` is ``(x, y, height)`` directly.
dim         3    ``log(l), log(w), log(h)``: extents along the box's own x (heading), y, z. In
                 nuScenes' ``wlh`` order that is ``(exp(dim[1]), exp(dim[0]), exp(dim[2]))``.
rot         2    ``sin(yaw), cos(yaw)``; decoded as ``atan2(rot[0], rot[1])``.
vel         2    ``vx, vy`` in m/s, same frame.
heatmap     C    the query's class: focal loss, target = matched gt class or background.
==========  ===  ============================================================================

The dense class heatmap learns Gaussians drawn at the gt centres' cells (mmdet3d's
``gaussian_radius`` with TransFusion's overlap 0.1 on the box's length and width in cells,
at least ``min_radius`` cells, and ``draw_heatmap_gaussian``).

Assignment: Hungarian (``scipy.optimize.linear_sum_assignment``) of queries to gt boxes on
TransFusion's cost minus its 3D-IoU term: mmdet's ``FocalLossCost`` (weight 0.15) plus the
BEV centre L1 distance normalised by the grid extent (weight 0.25). The IoU term is left out
because our BEV cells are 3.6 m: the centre term already separates candidates, and a rotated
3D IoU would need mmcv's compiled IoU op on every host the tests run on.

Losses (TransFusion's nuScenes weights): mmdet ``GaussianFocalLoss`` on the clipped sigmoid of
the dense heatmap (weight 1, averaged over the gt peaks), mmdet ``FocalLoss`` (sigmoid,
gamma 2, alpha 0.25, weight 1, averaged over matched queries) on the queries' class logits,
mmdet ``L1Loss`` (weight 0.25, averaged over matched queries) on the 10 regression channels
with code weights 1 for centre, height, dim and rot and 0.2 for velocity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from mmdet.models.losses import FocalLoss, GaussianFocalLoss, L1Loss
from mmdet.models.task_modules.assigners.match_cost import FocalLossCost
from mmdet3d.models.utils import clip_sigmoid
from mmdet3d.models.utils.gaussian import draw_heatmap_gaussian, gaussian_radius
from mmengine.structures import InstanceData
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

#: order of the regression channels, as concatenated for the L1 loss
REGRESSION_HEADS: tuple[tuple[str, int], ...] = (("center", 2), ("height", 1), ("dim", 3), ("rot", 2), ("vel", 2))
CODE_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)


@dataclass(frozen=True)
class BevGrid:
    """The head's output grid: cell ``(i, j)`` of a ``[X, Y]`` map covers
    ``x in [x_min + i * step_x, x_min + (i + 1) * step_x)`` and likewise for y."""

    x_min: float
    y_min: float
    step_x: float
    step_y: float
    nx: int
    ny: int

    @classmethod
    def of_head(cls, head: nn.Module, nx: int, ny: int) -> BevGrid:
        """The grid of a TransFusionHead whose dense heatmap is ``[.., nx, ny]``."""
        f = head.out_size_factor
        return cls(head.pc_range[0], head.pc_range[1], head.voxel_size[0] * f, head.voxel_size[1] * f, nx, ny)

    def to_cells(self, xy: Tensor) -> Tensor:
        """Metric ``[..., 2]`` -> continuous cell coordinates (the ``center`` channel's units)."""
        return torch.stack(((xy[..., 0] - self.x_min) / self.step_x, (xy[..., 1] - self.y_min) / self.step_y), -1)

    def inside(self, xy: Tensor) -> Tensor:
        """Which metric centres fall on the grid (only those can be targets)."""
        cells = self.to_cells(xy)
        return (cells[..., 0] >= 0) & (cells[..., 0] < self.nx) & (cells[..., 1] >= 0) & (cells[..., 1] < self.ny)


@dataclass(frozen=True)
class GroundTruth:
    """One sample's boxes on the grid: internal boxes ``[K, 7]``, labels ``[K]``, velocity ``[K, 2]``."""

    boxes: Tensor
    labels: Tensor
    velocity: Tensor

    @classmethod
    def from_meta(
        cls, meta: Mapping, class_names: Sequence[str], grid: BevGrid, device: torch.device | str = "cpu"
    ) -> GroundTruth:
        """Boxes of ``batch["metas"][i]`` whose class is known and whose centre is on the grid."""
        boxes = torch.as_tensor(np.asarray(meta["gt_boxes"], dtype=np.float32).reshape(-1, 7))
        velocity = torch.as_tensor(np.asarray(meta["gt_velocity"], dtype=np.float32).reshape(-1, 2))
        index = {name: i for i, name in enumerate(class_names)}
        labels = torch.tensor([index.get(str(n), -1) for n in meta["gt_names"]], dtype=torch.long)
        keep = (labels >= 0) & grid.inside(boxes[:, :2]) & torch.isfinite(boxes).all(dim=1)
        return cls(boxes[keep], labels[keep], torch.nan_to_num(velocity[keep])).to(device)

    def to(self, device: torch.device | str) -> GroundTruth:
        return GroundTruth(self.boxes.to(device), self.labels.to(device), self.velocity.to(device))


def regression_targets(gt: GroundTruth, grid: BevGrid) -> Tensor:
    """``[K, 10]`` targets in the channel order of :data:`REGRESSION_HEADS` (see module doc)."""
    b = gt.boxes
    return torch.cat(
        (
            grid.to_cells(b[:, :2]),
            b[:, 2:3],
            b[:, 3:6].clamp(min=1e-3).log(),
            torch.sin(b[:, 6:7]),
            torch.cos(b[:, 6:7]),
            gt.velocity,
        ),
        dim=1,
    )


def heatmap_targets(
    gt: GroundTruth, grid: BevGrid, num_classes: int, min_radius: int = 1, overlap: float = 0.1
) -> Tensor:
    """``[C, X, Y]`` Gaussian peaks (value 1 at each gt centre's cell), as TransFusion draws them."""
    heatmap = gt.boxes.new_zeros((num_classes, grid.nx, grid.ny))
    cells = grid.to_cells(gt.boxes[:, :2])
    for k in range(len(gt.boxes)):
        length = gt.boxes[k, 3] / grid.step_x
        width = gt.boxes[k, 4] / grid.step_y
        radius = max(int(min_radius), int(gaussian_radius((length, width), min_overlap=overlap)))
        ix, iy = int(cells[k, 0]), int(cells[k, 1])
        # draw_heatmap_gaussian indexes heatmap[center[1], center[0]]; our maps are [X, Y].
        draw_heatmap_gaussian(heatmap[gt.labels[k]], (iy, ix), radius)
    return heatmap


def regression_predictions(preds: Mapping[str, Tensor]) -> Tensor:
    """The head's regression outputs ``[B, P, 10]`` in the order of :data:`REGRESSION_HEADS`."""
    return torch.cat([preds[name] for name, _ in REGRESSION_HEADS], dim=1).transpose(1, 2)


class HungarianAssigner:
    """Queries -> gt boxes minimising ``cls_weight * focal cost + reg_weight * BEV L1``."""

    def __init__(self, grid: BevGrid, cls_weight: float = 0.15, reg_weight: float = 0.25) -> None:
        self.grid = grid
        self.cls_cost = FocalLossCost(weight=cls_weight)
        self.reg_weight = reg_weight

    @torch.no_grad()
    def __call__(self, logits: Tensor, centers: Tensor, gt: GroundTruth) -> tuple[Tensor, Tensor]:
        """Matched (query indices, gt indices) for one sample; ``logits`` ``[P, C]``,
        ``centers`` ``[P, 2]`` in cells (the head's ``center`` output)."""
        if len(gt.labels) == 0:
            empty = torch.zeros(0, dtype=torch.long, device=logits.device)
            return empty, empty
        cost = self.cls_cost(InstanceData(scores=logits.float()), InstanceData(labels=gt.labels))
        gt_cells = self.grid.to_cells(gt.boxes[:, :2])
        extent = centers.new_tensor([self.grid.nx, self.grid.ny])
        cost = cost + self.reg_weight * torch.cdist(centers.float() / extent, gt_cells / extent, p=1)
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        device = logits.device
        return torch.as_tensor(rows, dtype=torch.long, device=device), torch.as_tensor(cols, dtype=torch.long, device=device)


class TransFusionObjective(nn.Module):
    """The three TransFusion losses for a batch of head predictions (see the module doc)."""

    def __init__(
        self,
        num_classes: int,
        grid: BevGrid,
        min_radius: int = 1,
        gaussian_overlap: float = 0.1,
        heatmap_weight: float = 1.0,
        cls_weight: float = 1.0,
        bbox_weight: float = 0.25,
        code_weights: Sequence[float] = CODE_WEIGHTS,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.grid = grid
        self.min_radius = min_radius
        self.gaussian_overlap = gaussian_overlap
        self.assigner = HungarianAssigner(grid)
        self.loss_heatmap = GaussianFocalLoss(reduction="mean", loss_weight=heatmap_weight)
        self.loss_cls = FocalLoss(use_sigmoid=True, gamma=2.0, alpha=0.25, reduction="mean", loss_weight=cls_weight)
        self.loss_bbox = L1Loss(reduction="mean", loss_weight=bbox_weight)
        self.code_weights = torch.tensor(code_weights, dtype=torch.float32)

    def targets(self, preds: Mapping[str, Tensor], gts: Sequence[GroundTruth]) -> dict[str, Tensor]:
        """Heatmap targets ``[B, C, X, Y]``, query labels ``[B, P]`` (C = background),
        regression targets and weights ``[B, P, 10]``, on the predictions' device.

        Built on the CPU (many tiny per-box operations, and the Hungarian solver runs there
        anyway), then moved in one go.
        """
        device = preds["heatmap"].device
        logits = preds["heatmap"].detach().transpose(1, 2).float().cpu()  # [B, P, C]
        centers = preds["center"].detach().transpose(1, 2).float().cpu()  # [B, P, 2]
        batch, proposals = logits.shape[:2]
        labels = torch.full((batch, proposals), self.num_classes, dtype=torch.long)
        reg = torch.zeros(batch, proposals, len(self.code_weights))
        reg_weight = torch.zeros_like(reg)
        heatmaps = []
        for b, gt in enumerate(gts):
            gt = gt.to("cpu")
            heatmaps.append(heatmap_targets(gt, self.grid, self.num_classes, self.min_radius, self.gaussian_overlap))
            rows, cols = self.assigner(logits[b], centers[b], gt)
            labels[b, rows] = gt.labels[cols]
            reg[b, rows] = regression_targets(gt, self.grid)[cols]
            reg_weight[b, rows] = self.code_weights
        out = {"heatmap": torch.stack(heatmaps), "labels": labels, "regression": reg, "regression_weight": reg_weight}
        return {k: v.to(device, non_blocking=True) for k, v in out.items()}

    def forward(self, preds: Mapping[str, Tensor], gts: Sequence[GroundTruth]) -> dict[str, Tensor]:
        """``loss_heatmap``, ``loss_cls``, ``loss_bbox`` and their sum ``loss``; ``matched`` (count)."""
        t = self.targets(preds, gts)
        dense = preds["dense_heatmap"]
        peaks = max(float(t["heatmap"].eq(1).sum()), 1.0)
        loss_heatmap = self.loss_heatmap(clip_sigmoid(dense.float()), t["heatmap"], avg_factor=peaks)
        matched = t["labels"].lt(self.num_classes).sum()
        positives = max(float(matched), 1.0)
        logits = preds["heatmap"].transpose(1, 2).reshape(-1, self.num_classes).float()
        loss_cls = self.loss_cls(logits, t["labels"].reshape(-1), avg_factor=positives)
        loss_bbox = self.loss_bbox(
            regression_predictions(preds).float(), t["regression"], weight=t["regression_weight"], avg_factor=positives
        )
        return {
            "loss": loss_heatmap + loss_cls + loss_bbox,
            "loss_heatmap": loss_heatmap,
            "loss_cls": loss_cls,
            "loss_bbox": loss_bbox,
            "matched": matched,
        }
