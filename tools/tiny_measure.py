"""A simple detection measure: per-class precision and recall at 2 m BEV centre distance.

Tool code; nuScenes mAP/NDS (nuscenes-devkit) is the library's job. Rules, fixed before any
model was measured:

- predictions: ``TransFusionHead.decode`` boxes with score >= ``score_threshold``
  (default :data:`SCORE_THRESHOLD`, chosen a priori, never tuned on the results);
- ground truth: the sample's boxes of a known class whose centre lies on the head's BEV grid
  (elsewhere the model cannot place a query);
- matching, per sample and class: predictions in descending score order, each takes the
  nearest still-unmatched gt of its class within ``max_distance`` metres (BEV centre distance,
  as nuScenes' matching does); a matched prediction is a true positive, the others false
  positives, unmatched gts false negatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

SCORE_THRESHOLD = 0.3
MAX_DISTANCE_M = 2.0


@dataclass
class ClassCounts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def as_dict(self) -> dict[str, float | int | None]:
        found, truth = self.tp + self.fp, self.tp + self.fn
        return {
            "gt": truth,
            "predicted": found,
            "tp": self.tp,
            "precision": round(self.tp / found, 4) if found else None,
            "recall": round(self.tp / truth, 4) if truth else None,
        }


@dataclass
class DetectionMeasure:
    """Accumulates matches over samples; :meth:`summary` gives per-class precision/recall."""

    class_names: Sequence[str]
    score_threshold: float = SCORE_THRESHOLD
    max_distance: float = MAX_DISTANCE_M
    counts: dict[str, ClassCounts] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = {name: ClassCounts() for name in self.class_names}

    def add(self, boxes: dict[str, Tensor], gt_centers: Tensor, gt_labels: Tensor) -> None:
        """One sample: decoded ``boxes`` (``center``, ``score``, ``label``) against gt
        centres ``[K, >=2]`` and labels ``[K]``."""
        keep = boxes["score"] >= self.score_threshold
        centers, scores, labels = boxes["center"][keep].cpu(), boxes["score"][keep].cpu(), boxes["label"][keep].cpu()
        gt_centers, gt_labels = gt_centers.cpu(), gt_labels.cpu()
        for c, name in enumerate(self.class_names):
            pred = centers[labels == c][scores[labels == c].argsort(descending=True), :2]
            truth = gt_centers[gt_labels == c, :2]
            taken = torch.zeros(len(truth), dtype=torch.bool)
            tp = 0
            for p in pred:
                if not len(truth):
                    break
                dist = (truth - p).norm(dim=1).masked_fill(taken, float("inf"))
                best = int(dist.argmin())
                if dist[best] <= self.max_distance:
                    taken[best] = True
                    tp += 1
            counts = self.counts[name]
            counts.tp += tp
            counts.fp += len(pred) - tp
            counts.fn += len(truth) - tp

    def summary(self) -> dict:
        per_class = {name: c.as_dict() for name, c in self.counts.items()}
        total = ClassCounts(
            sum(c.tp for c in self.counts.values()),
            sum(c.fp for c in self.counts.values()),
            sum(c.fn for c in self.counts.values()),
        )
        return {
            "score_threshold": self.score_threshold,
            "max_distance_m": self.max_distance,
            "per_class": per_class,
            "all_classes": total.as_dict(),
        }


def format_summary(summary: dict) -> str:
    """A fixed-width table of :meth:`DetectionMeasure.summary`."""

    def pct(v: float | None) -> str:
        return "   -  " if v is None else f"{100 * v:5.1f}%"

    lines = [
        f"precision / recall at {summary['max_distance_m']:g} m, score >= {summary['score_threshold']:g}",
        f"{'class':<22}{'gt':>7}{'pred':>7}{'tp':>7}  precision  recall",
    ]
    rows = list(summary["per_class"].items()) + [("all classes", summary["all_classes"])]
    for name, r in rows:
        lines.append(
            f"{name:<22}{r['gt']:>7}{r['predicted']:>7}{r['tp']:>7}     {pct(r['precision'])}  {pct(r['recall'])}"
        )
    return "\n".join(lines)
