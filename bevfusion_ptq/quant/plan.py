"""The quantizer plan: every quantizer a rule set will create, before any calibration.

Users review this (``bevfusion-ptq plan``) before spending GPU time: where quantizers sit,
which share one scale, and which the exclusions will disable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pytorch_quantization.nn import TensorQuantizer
from torch import nn

from bevfusion_ptq.quant.insert import QuantPlan, matches


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


def _axis(q: TensorQuantizer) -> list[int] | None:
    axis = q.axis
    if axis is None:
        return None
    return list(axis) if isinstance(axis, (list, tuple)) else [int(axis)]


def plan_quantizers(model: nn.Module, plan: QuantPlan) -> list[PlannedQuantizer]:
    """Describe the quantizers of a model that ``insert_quantizers`` has just processed.

    ``enabled`` is what calibration will leave: a quantizer is disabled when the module
    holding it matches an exclusion under any of its names.
    """
    names: dict[int, list[str]] = {}
    objects: dict[int, TensorQuantizer] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, TensorQuantizer):
            names.setdefault(id(module), []).append(path)
            objects[id(module)] = module
    group_of: dict[int, str] = {}
    for group in plan.share:
        first = model.get_submodule(group.members[0])._input_quantizer
        group_of[id(first)] = group.name
    rows = []
    for key, quantizer in objects.items():
        paths = names[key]
        excluded = any(matches(p.rpartition(".")[0], plan.exclude) for p in paths)
        calibrator = type(getattr(quantizer, "_calibrator", None)).__name__
        rows.append(
            PlannedQuantizer(
                names=paths,
                share_group=group_of.get(key),
                enabled=not excluded and not quantizer._disabled,
                num_bits=quantizer.num_bits,
                axis=_axis(quantizer),
                calibrator={"HistogramCalibrator": "histogram", "MaxCalibrator": "max"}.get(calibrator, "none"),
            )
        )
    return rows
