"""Per-group sensitivity on a calibrated bevfusion-tiny: groups, ranking, proposal, chart."""

from __future__ import annotations

import base64
import copy
import json

import pytest

from bevfusion_ptq.quant.compat import iter_quantizers
from bevfusion_ptq.quant.report import quantizer_paths
from bevfusion_ptq.quant.rules import bevfusion_rules
from bevfusion_ptq.quant.sensitivity import (
    FidelityMetric,
    analyse_sensitivity,
    disable_quantizers,
    quantizer_groups,
)
from bevfusion_ptq.quant.sensitivity_chart import markdown_image, sensitivity_png
from tests.model_helpers import torch_threads
from tests.test_fidelity import calibrated_tiny


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    model, batches = calibrated_tiny(tmp_path_factory)
    model = copy.deepcopy(model)
    flags = {n: q._disabled for n, q in iter_quantizers(model)}
    groups = quantizer_groups(model, bevfusion_rules().share)
    # Four groups (the rest stay FP32 throughout) keep the test to a dozen forwards.
    chosen = [g for g in groups if g.name in ("layer3-lateral0", "encoders.lidar.backbone.conv_input.0")]
    chosen += [g for g in groups if g.modules[0].startswith("decoder.")][:2]
    with torch_threads(1):
        metric = FidelityMetric(batches[2:])
        result = analyse_sensitivity(model, chosen, metric)
        result = analyse_sensitivity(model, chosen, metric, target=result.all_drop / 2)
    return model, batches, groups, chosen, result, flags


def test_groups_cover_every_quantizer_once_and_keep_share_groups_together(analysed):
    model, _, groups, _, _, _ = analysed
    listed = [p for g in groups for p in g.quantizers]
    assert sorted(listed) == sorted(paths[0] for _, paths in quantizer_paths(model))
    by_name = {g.name: g for g in groups}
    lateral = by_name["layer3-lateral0"]
    for member in bevfusion_rules().share[0].members:
        assert member in lateral.modules
    # a layer's input and weight quantizers are one group
    conv = next(g for g in groups if "decoder.neck.deblocks.0.0" in g.modules)
    assert {"decoder.neck.deblocks.0.0._input_quantizer", "decoder.neck.deblocks.0.0._weight_quantizer"} <= set(conv.quantizers)


def test_ranking_and_proposal_hold_what_they_claim(analysed):
    model, batches, _, groups, result, flags = analysed
    assert len(groups) == 4
    assert len(result.groups) == len(groups) and result.evaluations >= 1 + 2 * len(groups)
    assert [g.rank for g in result.groups] == list(range(1, len(groups) + 1))
    recoveries = [g.recovery for g in result.groups]
    assert recoveries == sorted(recoveries, reverse=True)
    for g in result.groups:
        assert g.recovery == pytest.approx(result.all_drop - g.all_but)
        assert g.only >= 0
    assert result.all_drop > 0
    p = result.proposal
    assert p.met and p.drop <= p.target == pytest.approx(result.all_drop / 2)
    assert 0 < len(p.groups) < len(groups)
    # the proposal, applied as --exclude auto would, measures the drop it reported
    with torch_threads(1):
        trial = copy.deepcopy(model)
        quantizers = dict(iter_quantizers(trial)).values()
        metric = FidelityMetric(batches[2:])
        for q in quantizers:
            q._disabled = True
        metric.prepare(trial)
        for q in quantizers:
            q._disabled = False
        for path, q in iter_quantizers(trial):  # outside the analysed groups: FP32, as in the analysis
            if path not in {p for g in groups for p in g.quantizers}:
                q._disabled = True
        assert disable_quantizers(trial, p.quantizers) == list(p.quantizers)
        again = metric.drop(trial)
    assert again == pytest.approx(p.drop, rel=1e-6)
    # the analysis put every flag back
    assert {n: q._disabled for n, q in iter_quantizers(model)} == flags


def test_outputs_render(analysed):
    _, _, _, _, result, _ = analysed
    md = result.markdown(top=5)
    assert result.groups[0].name in md and "Proposed exclusions" in md
    png = sensitivity_png(result, top=5)
    assert png.startswith(b"\x89PNG")
    image = markdown_image(png)
    assert image.startswith("![sensitivity chart](data:image/png;base64,")
    assert base64.b64decode(image.split(",", 1)[1].rstrip(")")) == png
    assert json.loads(json.dumps(result.as_dict()))["proposal"]["groups"] == list(result.proposal.groups)
