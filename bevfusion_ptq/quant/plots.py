"""PNG plots of calibration histograms with the chosen amax, for people judging calibration.

A histogram with its amax line answers the question no table does: is the clipping
threshold sitting in the tail where it belongs, or is it cutting into the bulk of the
distribution (or leaving most of the INT8 range unused)? We plot a few representative
quantizers rather than all ~200: a reviewer looks at a handful.

Selection (deterministic, model order breaks ties):

1. the enabled quantizer with the largest clipped share (the likeliest problem);
2. per branch (camera backbone, lidar backbone, fuser/decoder) its first enabled histogram
   quantizer in model order: the branch's input, whose distribution is the least shaped
   by earlier quantization;
3. further slots, if ``max_plots`` allows, by descending clipped share.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through
``pyplot``: no display is needed, no global figure state leaks between calls, and it is
safe in a Prefect worker thread.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pytorch_quantization import calib
from torch import Tensor, nn

from bevfusion_ptq.errors import ConfigError
from bevfusion_ptq.quant import compat

log = logging.getLogger(__name__)

#: (label, module path prefixes) of the branches that each get one plot
BEVFUSION_BRANCHES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("camera backbone", ("encoders.camera.backbone",)),
    ("lidar backbone", ("encoders.lidar.backbone",)),
    ("fuser / decoder", ("fuser", "decoder")),
)
LARGEST_CLIPPED = "largest clipped share"


@dataclass(frozen=True)
class HistogramView:
    """One quantizer's collected histogram of |x| (on the CPU), its amax and why it was chosen."""

    name: str
    hist: Tensor
    edges: Tensor
    amax: float
    clipped_share: float
    reason: str


def clipped_share(hist: Tensor, edges: Tensor, amax: float) -> float:
    """Share of the collected values above ``amax`` (they saturate at the INT8 limit).

    The bin that contains ``amax`` counts in proportion to the part of it above ``amax``
    (values assumed uniform within a bin).
    """
    hist = hist.double()
    total = float(hist.sum())
    if total <= 0:
        return 0.0
    lo, hi = edges[:-1].double(), edges[1:].double()
    width = hi - lo
    above = torch.where(width > 0, ((hi - amax) / width.clamp_min(1e-300)).clamp(0, 1), (lo > amax).double())
    return float((hist * above).sum()) / total


def _view(name: str, quantizer: nn.Module, reason: str = "") -> HistogramView | None:
    """The plottable histogram of a quantizer, or None (no histogram, disabled, no scalar amax)."""
    calibrator = getattr(quantizer, "_calibrator", None)
    if not isinstance(calibrator, calib.HistogramCalibrator) or quantizer._disabled:
        return None
    hist, edges = calibrator._calib_hist, calibrator._calib_bin_edges
    amax = getattr(quantizer, "_amax", None)
    if hist is None or edges is None or amax is None or amax.numel() != 1:
        return None
    hist = torch.as_tensor(hist).detach().float().cpu()
    edges = torch.as_tensor(edges).detach().float().cpu()
    # Grown torch histograms can carry one edge more than bins + 1 (arange rounding).
    n = min(hist.numel(), edges.numel() - 1)
    hist, edges = hist[:n], edges[: n + 1]
    value = float(amax.detach().float().cpu().reshape(()))
    return HistogramView(name, hist, edges, value, clipped_share(hist, edges, value), reason)


def _in_branch(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def select_histograms(
    model: nn.Module,
    max_plots: int = 4,
    *,
    branches: Sequence[tuple[str, Sequence[str]]] = BEVFUSION_BRANCHES,
) -> list[HistogramView]:
    """The representative histograms to plot, in plot order (see the module docstring)."""
    if max_plots < 0:
        raise ConfigError(f"max_plots must be >= 0, got {max_plots}")
    views = [v for name, q in compat.iter_quantizers(model) if (v := _view(name, q)) is not None]
    if not views or max_plots == 0:
        if not views:
            log.warning("no calibrated histogram is held by the model's quantizers: nothing to plot")
        return []
    chosen: list[HistogramView] = []
    names: set[str] = set()

    def take(view: HistogramView, reason: str) -> None:
        if view.name not in names:
            names.add(view.name)
            chosen.append(HistogramView(view.name, view.hist, view.edges, view.amax, view.clipped_share, reason))

    by_clipping = sorted(views, key=lambda v: -v.clipped_share)  # stable: model order among ties
    take(by_clipping[0], LARGEST_CLIPPED)
    for label, prefixes in branches:
        first = next((v for v in views if _in_branch(v.name, prefixes) and v.name not in names), None)
        if first is not None:
            take(first, f"{label} input")
    for view in by_clipping:
        take(view, "clipped share rank")
    return chosen[:max_plots]


def histogram_figure(view: HistogramView, method: str | None = None) -> Figure:
    """The figure for one histogram: counts on a log scale, the amax as a vertical line."""
    fig = Figure(figsize=(7.0, 4.3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    hist = view.hist.numpy()
    edges = view.edges.numpy()
    ax.stairs(hist, edges, color="tab:blue", linewidth=1.0, label="collected |x|")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)
    label = f"amax = {view.amax:.4g}" + (f" ({method})" if method else "")
    clipped = f"{label}; clipped {view.clipped_share:.3%}"
    ax.axvline(view.amax, color="tab:red", linestyle="--", linewidth=1.5, label=clipped)
    ax.set_xlim(0.0, max(float(edges[-1]), view.amax) * 1.02 or 1.0)
    ax.set_xlabel("|activation|")
    ax.set_ylabel("count (log)")
    ax.set_title(f"{view.name}\n{view.reason}: {view.clipped_share:.3%} of values above amax", fontsize=9)
    # Below the axes: inside, any corner can hide the tail or the amax line.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_filename(name: str) -> str:
    """A file name from a quantizer path: only ``[A-Za-z0-9._-]``, stable across runs."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "quantizer"
    return f"{stem}.png"


def plot_histograms(
    model: nn.Module,
    out_dir: Path,
    *,
    max_plots: int = 4,
    method: str | None = None,
    branches: Sequence[tuple[str, Sequence[str]]] = BEVFUSION_BRANCHES,
) -> list[Path]:
    """Write PNGs of up to ``max_plots`` representative histograms into ``out_dir``.

    ``method`` (the calibration method) only labels the amax line. Returns the written
    paths in plot order; an empty list (and a warning) when no quantizer holds a histogram,
    e.g. a model rebuilt by ``load_quantized`` rather than calibrated.
    """
    out_dir = Path(out_dir)
    views = select_histograms(model, max_plots, branches=branches)
    if not views:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for view in views:
        path = out_dir / plot_filename(view.name)
        histogram_figure(view, method).savefig(path, format="png")
        share = 100 * view.clipped_share
        log.info("histogram plot %s: amax %.4g, clipped %.3f%% (%s)", path.name, view.amax, share, view.reason)
        paths.append(path)
    return paths


__all__ = [
    "BEVFUSION_BRANCHES",
    "HistogramView",
    "clipped_share",
    "histogram_figure",
    "plot_filename",
    "plot_histograms",
    "select_histograms",
]
