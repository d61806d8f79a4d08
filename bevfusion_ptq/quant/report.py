"""Quantizer status as data: what the calibrated model will do, quantizer by quantizer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from pytorch_quantization import calib
from pytorch_quantization.nn import TensorQuantizer
from torch import nn

from bevfusion_ptq.quant.rules import ShareGroup


@dataclass(frozen=True)
class QuantizerStatus:
    """One quantizer: the reference's report line, plus what a reviewer needs to judge it."""

    name: str
    share_group: str | None
    enabled: bool
    num_bits: int
    axis: list[int] | None
    calibrator: str
    method: str
    amax: float | list[float] | None  # scalar per tensor; per-channel list otherwise
    amax_min: float | None
    amax_median: float | None
    amax_max: float | None
    names: list[str]  # every module path reaching this one quantizer object
    # --calib-method auto: the winner, its margin over the runner-up and over mse, every
    # candidate's error and amax (see bevfusion_ptq.quant.auto_amax.AmaxChoice)
    auto: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def quantizer_paths(model: nn.Module) -> list[tuple[TensorQuantizer, list[str]]]:
    """Every quantizer object once, in model order, with every path that reaches it."""
    found: dict[int, tuple[TensorQuantizer, list[str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, TensorQuantizer):
            found.setdefault(id(module), (module, []))[1].append(path)
    return list(found.values())


def share_groups(model: nn.Module, groups: Sequence[ShareGroup]) -> dict[int, str]:
    """Quantizer object id -> share-group name, for the rule set's groups and block-local sharing.

    A quantizer reached under several paths that no rule-set group names is shared inside one
    block (a Bottleneck's conv1, downsample and identity): it is labelled ``residual:<block>``.
    """
    named: dict[int, str] = {}
    for group in groups:
        leader = getattr(model.get_submodule(group.members[0]), "_input_quantizer", None)
        if leader is not None:
            named[id(leader)] = group.name
    for quantizer, paths in quantizer_paths(model):
        if id(quantizer) not in named and len(paths) > 1:
            parts = [p.split(".")[:-1] for p in paths]
            common = [names[0] for names in zip(*parts) if len(set(names)) == 1]
            named[id(quantizer)] = f"residual:{'.'.join(common)}"
    return named


def calibrator_kind(q) -> str:
    """``histogram``, ``max`` or ``none``: the calibrator a quantizer collects with."""
    c = getattr(q, "_calibrator", None)
    if isinstance(c, calib.HistogramCalibrator):
        return "histogram"
    if isinstance(c, calib.MaxCalibrator):
        return "max"
    return "none"


def axis_list(q) -> list[int] | None:
    """A quantizer's axis as a JSON-able list (None: per tensor)."""
    axis = q.axis
    if axis is None:
        return None
    return [int(a) for a in axis] if isinstance(axis, (list, tuple)) else [int(axis)]


def quantizer_status(
    model: nn.Module, method: str, groups: Sequence[ShareGroup] = ()
) -> list[QuantizerStatus]:
    """Every quantizer object once, in model order, named by its first path."""
    group_of = share_groups(model, groups)
    rows = []
    for q, paths in quantizer_paths(model):
        amax = getattr(q, "_amax", None)
        kind = calibrator_kind(q)
        choice = getattr(q, "_amax_choice", None)
        if amax is None:
            values = None
            lo = med = hi = None
        else:
            flat = amax.detach().float().cpu().flatten()
            values = flat.item() if flat.numel() == 1 else flat.tolist()
            lo, med, hi = (float(flat.min()), float(torch.median(flat)), float(flat.max()))
        rows.append(
            QuantizerStatus(
                name=paths[0],
                share_group=group_of.get(id(q)),
                enabled=not q._disabled,
                num_bits=q.num_bits,
                axis=axis_list(q),
                calibrator=kind,
                method=(f"auto:{choice['winner']}" if choice else method) if kind == "histogram" else kind,
                amax=values,
                amax_min=lo,
                amax_median=med,
                amax_max=hi,
                names=paths,
                auto=choice if kind == "histogram" else None,
            )
        )
    return rows
