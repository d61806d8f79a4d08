"""The quantizer plan: every quantizer a rule set will create, before any calibration.

Users review this (``bevfusion-ptq plan``) before spending GPU time: where quantizers sit,
which share one scale, and which the exclusions will disable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from bevfusion_ptq.quant.insert import QuantPlan, matches
from bevfusion_ptq.quant.report import axis_list, calibrator_kind, quantizer_paths, share_groups


@dataclass(frozen=True)
class PlannedQuantizer:
    """One quantizer object, under every module path that reaches it."""

    names: list[str]
    share_group: str | None
    enabled: bool
    num_bits: int
    axis: list[int] | None
    calibrator: str

    def as_dict(self) -> dict:
        return asdict(self)


def plan_quantizers(model: nn.Module, plan: QuantPlan) -> list[PlannedQuantizer]:
    """Describe the quantizers of a model that ``insert_quantizers`` has just processed.

    ``enabled`` is what calibration will leave: a quantizer is disabled when the module
    holding it matches an exclusion under any of its names.
    """
    group_of = share_groups(model, plan.share)
    rows = []
    for quantizer, paths in quantizer_paths(model):
        excluded = any(matches(p.rpartition(".")[0], plan.exclude) for p in paths)
        rows.append(
            PlannedQuantizer(
                names=paths,
                share_group=group_of.get(id(quantizer)),
                enabled=not excluded and not quantizer._disabled,
                num_bits=quantizer.num_bits,
                axis=axis_list(quantizer),
                calibrator=calibrator_kind(quantizer),
            )
        )
    return rows
