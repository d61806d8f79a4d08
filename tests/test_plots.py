"""Histogram plots of a calibrated bevfusion-tiny: valid PNGs, deterministic choice, amax marked."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from bevfusion_ptq.errors import ConfigError
from bevfusion_ptq.quant.insert import insert_quantizers
from bevfusion_ptq.quant.plots import (
    LARGEST_CLIPPED,
    HistogramView,
    clipped_share,
    histogram_figure,
    plot_filename,
    plot_histograms,
    select_histograms,
)
from bevfusion_ptq.quant.rules import default_rules
from tests.quant_helpers import SmallFusionNet
# pytest imports test modules by basename (tests/ has no __init__.py): importing it the same
# way shares test_fidelity's calibrated model instead of calibrating a second copy.
from test_fidelity import calibrated_tiny  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> nn.Module:
    return calibrated_tiny(tmp_path_factory)[0]


def test_clipped_share_counts_the_part_above_amax():
    hist = torch.tensor([1.0, 1.0, 1.0, 1.0])
    edges = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    assert clipped_share(hist, edges, 2.5) == pytest.approx(0.375)  # half of bin 2, all of bin 3
    assert clipped_share(hist, edges, 4.0) == 0.0
    assert clipped_share(hist, edges, 0.0) == 1.0
    assert clipped_share(torch.zeros(4), edges, 1.0) == 0.0


def test_selection_is_representative_and_deterministic(model):
    views = select_histograms(model, 4)
    again = select_histograms(model, 4)
    assert [v.name for v in views] == [v.name for v in again]
    assert len(views) == 4 and len({v.name for v in views}) == 4
    # first: the largest clipped share of all enabled histogram quantizers
    everything = select_histograms(model, 10_000)
    assert views[0].reason == LARGEST_CLIPPED
    assert views[0].clipped_share == max(v.clipped_share for v in everything)
    reasons = {v.reason: v.name for v in views[1:]}
    assert reasons["camera backbone input"].startswith("encoders.camera.backbone.")
    assert reasons["lidar backbone input"].startswith("encoders.lidar.backbone.")
    assert reasons["fuser / decoder input"].startswith(("fuser.", "decoder."))
    # excluded (disabled) quantizers are never shown
    assert not any(v.name.startswith("encoders.lidar.backbone.conv_input.") for v in everything)
    assert all(v.amax > 0 and 0.0 <= v.clipped_share <= 1.0 for v in everything)


def test_plot_files_are_valid_pngs_with_deterministic_names(model, tmp_path):
    paths = plot_histograms(model, tmp_path / "plots", max_plots=4, method="percentile")
    assert 0 < len(paths) <= 4
    assert [p.name for p in paths] == [plot_filename(v.name) for v in select_histograms(model, 4)]
    for path in paths:
        assert path.is_file() and path.parent == tmp_path / "plots"
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
            img.verify()
    assert len(plot_histograms(model, tmp_path / "two", max_plots=2)) == 2
    assert plot_histograms(model, tmp_path / "none", max_plots=0) == []
    with pytest.raises(ConfigError, match="max_plots"):
        plot_histograms(model, tmp_path / "bad", max_plots=-1)


def test_figure_marks_the_amax_with_a_vertical_line(model):
    view = select_histograms(model, 1)[0]
    fig = histogram_figure(view, method="percentile")
    (ax,) = fig.axes
    vertical = [line for line in ax.get_lines() if list(line.get_xdata()) == [view.amax, view.amax]]
    assert len(vertical) == 1
    assert ax.get_yscale() == "log"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(f"amax = {view.amax:.4g} (percentile)" in t and "clipped" in t for t in legend)
    assert view.name in ax.get_title() and "above amax" in ax.get_title()


def test_synthetic_histogram_figure_and_filename():
    view = HistogramView("a/b c.d", torch.tensor([5.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0, 3.0]), 1.5, 0.4, "x")
    fig = histogram_figure(view)
    assert any(list(line.get_xdata()) == [1.5, 1.5] for line in fig.axes[0].get_lines())
    assert plot_filename("a/b c.d") == "a_b_c.d.png"
    assert plot_filename("encoders.camera.backbone.conv1._input_quantizer") == (
        "encoders.camera.backbone.conv1._input_quantizer.png"
    )


def test_model_without_histograms_writes_nothing(tmp_path):
    net = SmallFusionNet()
    insert_quantizers(net, default_rules(()))  # histogram calibrators exist but never collected
    assert plot_histograms(net, tmp_path / "plots") == []
    assert not (tmp_path / "plots").exists()
