"""nuScenes detection metrics from nuscenes-devkit's ``DetectionEval``, and its plots.

Everything numeric here is the devkit's: matching by centre distance, AP over the four
distance thresholds, the five true-positive errors, NDS. We add two things around it:

- **A subset of the split.** ``DetectionEval`` insists that the predictions cover exactly
  the samples of the split. Evaluating every val keyframe of real nuScenes (6019) twice is
  expensive, so ``--eval-samples`` may choose fewer; then the ground truth must be restricted
  to the same samples, otherwise every box of an unevaluated sample would count as missed.
  :class:`SampleSubsetEval` is ``DetectionEval`` with exactly that change: its ground truth
  comes from the devkit's own ``load_gt_of_sample_tokens`` for the evaluated samples (all of
  which must belong to the split), and the rest (centre distances, range and point filters,
  accumulation, AP/TP/NDS) is the parent's. Metrics on a subset estimate the split's; they
  equal them when the subset is the whole split (a test checks this).
- **Plots as PNG.** ``DetectionEval.render`` writes PDFs, which a browser-based UI cannot
  show; we call the same devkit render functions with ``.png`` paths.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Sequence
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bevfusion_ptq.errors import DatasetError

log = logging.getLogger(__name__)

#: The devkit's detection configuration (class ranges, distance thresholds, NDS weights).
CONFIG_NAME = "detection_cvpr_2019"
#: Short names of the TP errors, as the devkit prints them.
TP_ERROR_NAMES: dict[str, str] = {
    "trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE", "attr_err": "mAAE",
}  # fmt: skip
_SUMMARY_DPI = 40  # the summary figure is 15 x 50 inches: 600 x 2000 px at this resolution
_CURVE_DPI = 80


def _detection_eval_class() -> type:
    from nuscenes.eval.common.loaders import (
        add_center_dist, filter_eval_boxes, load_gt_of_sample_tokens, load_prediction,
    )
    from nuscenes.eval.detection.data_classes import DetectionBox
    from nuscenes.eval.detection.evaluate import DetectionEval

    class SampleSubsetEval(DetectionEval):
        """``DetectionEval`` on the samples of the predictions only (see module docstring)."""

        def __init__(self, nusc: Any, config: Any, result_path: str, sample_tokens: Sequence[str],
                     output_dir: str, verbose: bool = False) -> None:  # fmt: skip
            self.nusc, self.result_path, self.eval_set = nusc, result_path, "subset"
            self.output_dir, self.verbose, self.cfg = output_dir, verbose, config
            self.plot_dir = str(Path(output_dir) / "plots")
            Path(self.plot_dir).mkdir(parents=True, exist_ok=True)
            self.pred_boxes, self.meta = load_prediction(result_path, config.max_boxes_per_sample, DetectionBox,
                                                         verbose=verbose)  # fmt: skip
            self.gt_boxes = load_gt_of_sample_tokens(nusc, list(sample_tokens), DetectionBox, verbose=verbose)
            if set(self.pred_boxes.sample_tokens) != set(self.gt_boxes.sample_tokens):
                raise ValueError("the predictions do not cover exactly the evaluated samples")
            self.pred_boxes = add_center_dist(nusc, self.pred_boxes)
            self.gt_boxes = add_center_dist(nusc, self.gt_boxes)
            self.pred_boxes = filter_eval_boxes(nusc, self.pred_boxes, config.class_range, verbose=verbose)
            self.gt_boxes = filter_eval_boxes(nusc, self.gt_boxes, config.class_range, verbose=verbose)
            self.sample_tokens = self.gt_boxes.sample_tokens

    return SampleSubsetEval


@dataclass(frozen=True)
class DetectionResult:
    """The devkit's serialized metrics (``DetectionMetrics.serialize()``) and where plots went.

    ``summary`` holds ``mean_ap``, ``nd_score``, ``tp_errors`` (the five mean errors),
    ``mean_dist_aps`` (AP per class), ``label_tp_errors`` (errors per class) and more.
    """

    summary: dict[str, Any]
    plots: tuple[str, ...]
    num_samples: int
    gt_boxes: int  # ground-truth boxes left after the devkit's range and point filters
    pred_boxes: int
    seconds: float
    #: ground-truth boxes per class after the filters: a class without any scores AP 0
    gt_per_class: dict[str, int] = field(default_factory=dict)

    @property
    def mean_ap(self) -> float:
        return float(self.summary["mean_ap"])

    @property
    def nd_score(self) -> float:
        return float(self.summary["nd_score"])


def evaluate_detections(
    nusc: Any,
    result_path: str | Path,
    split: str,
    sample_tokens: Sequence[str],
    out_dir: str | Path,
    *,
    split_tokens: Sequence[str] | None = None,
    render: bool = True,
) -> DetectionResult:
    """Evaluate the results file on ``sample_tokens`` of ``split`` with the devkit.

    When ``sample_tokens`` is the whole split, the devkit's ``DetectionEval`` runs as is;
    otherwise :class:`SampleSubsetEval` restricts the ground truth to them. ``split_tokens``
    (all samples of the split) may be passed when already known. Plots (``render``) are
    written to ``out_dir/plots/*.png``.
    """
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    from bevfusion_ptq.evaluation.database import split_sample_tokens

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_factory(CONFIG_NAME)
    in_split = set(split_tokens if split_tokens is not None else split_sample_tokens(nusc, split))
    outside = [t for t in sample_tokens if t not in in_split]
    if outside:
        raise DatasetError(
            f"{len(outside)} evaluated sample(s) are not in split {split!r} of {nusc.version} "
            f"(first: {outside[0]}): the info file and the nuScenes tables disagree"
        )
    with contextlib.redirect_stdout(io.StringIO()):
        if set(sample_tokens) == in_split:
            evaluator = DetectionEval(nusc, cfg, str(result_path), split, output_dir=str(out), verbose=False)
        else:
            evaluator = _detection_eval_class()(nusc, cfg, str(result_path), sample_tokens, str(out), verbose=False)
        metrics, metric_data = evaluator.evaluate()
    summary = metrics.serialize()
    plots = render_plots(metrics, metric_data, cfg, out / "plots") if render else ()
    result = DetectionResult(
        summary=summary,
        plots=tuple(str(p) for p in plots),
        num_samples=len(sample_tokens),
        gt_boxes=sum(len(evaluator.gt_boxes[t]) for t in evaluator.gt_boxes.sample_tokens),
        pred_boxes=sum(len(evaluator.pred_boxes[t]) for t in evaluator.pred_boxes.sample_tokens),
        seconds=time.perf_counter() - started,
        gt_per_class=dict(sorted(Counter(
            b.detection_name for t in evaluator.gt_boxes.sample_tokens for b in evaluator.gt_boxes[t]
        ).items())),
    )  # fmt: skip
    log.info(
        "nuScenes %s on %d samples: mAP %.4f, NDS %.4f (%d gt / %d predicted boxes after filters, %.1f s)",
        split, result.num_samples, result.mean_ap, result.nd_score, result.gt_boxes, result.pred_boxes, result.seconds,
    )  # fmt: skip
    return result


def render_plots(metrics: Any, metric_data: Any, cfg: Any, plot_dir: str | Path) -> list[Path]:
    """The devkit's summary (PR and TP curves per class) and per-distance PR curves, as PNG."""
    import matplotlib.pyplot as plt
    from nuscenes.eval.detection.render import dist_pr_curve, summary_plot

    folder = Path(plot_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with plt.rc_context({"savefig.dpi": _SUMMARY_DPI}):
        path = folder / "summary.png"
        summary_plot(metric_data, metrics, min_precision=cfg.min_precision, min_recall=cfg.min_recall,
                     dist_th_tp=cfg.dist_th_tp, savepath=str(path))  # fmt: skip
        written.append(path)
    with plt.rc_context({"savefig.dpi": _CURVE_DPI}):
        for dist_th in cfg.dist_ths:
            path = folder / f"dist_pr_{dist_th}.png"
            dist_pr_curve(metric_data, metrics, dist_th, cfg.min_precision, cfg.min_recall, savepath=str(path))
            written.append(path)
    plt.close("all")
    return written
