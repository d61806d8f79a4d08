"""Per-group sensitivity: what quantizing each layer costs, and the fewest layers to keep float.

A *group* is what must be switched together: a layer's input and weight quantizers, joined
with every other layer that uses one of the same quantizer objects (share groups, a
Bottleneck's conv1/downsample/identity). For each group the analysis measures, on held-out
batches, the drop of a metric in two settings:

* **only**: this group quantized, everything else FP32: the damage it does on its own;
* **recovery**: everything quantized except this group, compared with everything
  quantized: what leaving it in float buys in the real INT8 model.

Groups are ranked by recovery (the question an exclusion list answers), ties by ``only``.
The proposal walks the ranking, leaving groups in float until the measured drop is at most
the target, then tries to put each earlier pick back (it stays out only when the target
still holds without it), so the list is minimal against removal of any one member.

The metric is a seam (:class:`Metric`): a drop >= 0, 0 for FP32. :class:`FidelityMetric`
is the fidelity report's relative L2 error of the decoder output or the head's heatmap
against FP32; a nuScenes mAP/NDS metric plugs in with the same two methods. Every
measurement reuses the calibrated amax: nothing is collected again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from pytorch_quantization.nn import TensorQuantizer
from torch import Tensor, nn

from bevfusion_ptq.errors import CalibrationError
from bevfusion_ptq.quant.calibrate import default_forward
from bevfusion_ptq.quant.fidelity import STAGE_TITLES, bevfusion_forward, compare_tensors
from bevfusion_ptq.quant.insert import matches
from bevfusion_ptq.quant.report import quantizer_paths, share_groups
from bevfusion_ptq.quant.rules import ShareGroup

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


# ---------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class QuantizerGroup:
    """Quantizers switched together; ``modules`` are the layers that own them."""

    name: str
    modules: tuple[str, ...]
    quantizers: tuple[str, ...]  # first path of each quantizer object


def quantizer_groups(model: nn.Module, share: Sequence[ShareGroup] = ()) -> list[QuantizerGroup]:
    """Connected layers and quantizers, in model order, named by share group or first layer."""
    found = quantizer_paths(model)
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for _, paths in found:
        owners = [p.rpartition(".")[0] for p in paths]
        for owner in owners[1:]:
            parent[root(owner)] = root(owners[0])
        root(owners[0])
    label = share_groups(model, share)
    groups: dict[str, dict[str, Any]] = {}
    for q, paths in found:
        key = root(paths[0].rpartition(".")[0])
        g = groups.setdefault(key, {"name": None, "modules": [], "quantizers": []})
        g["quantizers"].append(paths[0])
        for p in paths:
            owner = p.rpartition(".")[0]
            if owner not in g["modules"]:
                g["modules"].append(owner)
        named = label.get(id(q))
        if named and (g["name"] is None or g["name"].startswith("residual:")):
            g["name"] = named
    return [
        QuantizerGroup(g["name"] or g["modules"][0], tuple(g["modules"]), tuple(g["quantizers"]))
        for g in groups.values()
    ]


# ---------------------------------------------------------------------------- metric seam
class Metric(Protocol):
    """A measured drop against FP32 on fixed batches: >= 0, 0 for the FP32 model.

    ``prepare`` sees the model with every quantizer off (its FP32 self) once; ``drop`` sees
    it as configured for one measurement.
    """

    name: str

    def prepare(self, model: nn.Module) -> None: ...

    def drop(self, model: nn.Module) -> float: ...


class FidelityMetric:
    """Mean relative L2 error of one output (``decoder_out`` or ``heatmap``) against FP32."""

    def __init__(self, batches: Sequence[Any], stage: str = "decoder_out", forward=None) -> None:
        if not batches:
            raise CalibrationError("the sensitivity metric needs at least one held-out batch")
        if forward is None:  # the decoder output needs no head: stop where calibration stops
            forward = default_forward if stage == "decoder_out" else bevfusion_forward
        self.batches, self.stage, self.forward = list(batches), stage, forward
        self.name = f"{STAGE_TITLES.get(stage, stage)} rel. L2 error"
        self.reference: list[Tensor] = []

    def _outputs(self, model: nn.Module) -> Iterable[Tensor]:
        for batch in self.batches:
            out = self.forward(model, batch)
            if self.stage not in out:
                raise CalibrationError(f"the model's forward returns no {self.stage!r}; it has {sorted(out)}")
            yield out[self.stage]

    def prepare(self, model: nn.Module) -> None:
        self.reference = [t.detach().clone() for t in self._outputs(model)]

    def drop(self, model: nn.Module) -> float:
        errors = [compare_tensors(q, f)[1] for q, f in zip(self._outputs(model), self.reference, strict=True)]
        return sum(errors) / len(errors)


# ---------------------------------------------------------------------------- analysis
@dataclass(frozen=True)
class GroupSensitivity:
    name: str
    modules: tuple[str, ...]
    quantizers: tuple[str, ...]
    only: float  # drop with only this group quantized
    all_but: float  # drop with everything but this group quantized
    recovery: float  # drop(all) - drop(all but this group)
    rank: int


@dataclass(frozen=True)
class Proposal:
    """The exclusion list for ``target``: groups left in float, and the drop it measured."""

    target: float
    groups: tuple[str, ...]
    modules: tuple[str, ...]
    quantizers: tuple[str, ...]
    drop: float
    met: bool
    steps: tuple[tuple[str, float], ...]  # (group added, drop after) on the greedy walk


@dataclass(frozen=True)
class SensitivityResult:
    metric: str
    num_batches: int
    all_drop: float  # every group quantized
    groups: tuple[GroupSensitivity, ...]  # ranked, most sensitive first
    proposal: Proposal | None
    evaluations: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self, top: int | None = None) -> list[dict[str, Any]]:
        rows = self.groups if top is None else self.groups[:top]
        return [
            {"rank": g.rank, "group": g.name, "layers": len(g.modules), "quantizers": len(g.quantizers),
             "only": round(g.only, 6), "all_but": round(g.all_but, 6), "recovery": round(g.recovery, 6)}
            for g in rows
        ]

    def markdown(self, top: int = 10) -> str:
        lines = [
            f"### Sensitivity: {self.metric} on {self.num_batches} held-out batch(es)",
            "",
            f"Everything quantized: drop {self.all_drop:.4g}. {len(self.groups)} groups, "
            f"{self.evaluations} measurements, {self.seconds:.1f} s.",
            "",
            "| rank | group | layers | only this group INT8 | all but this group INT8 | recovery |",
            "| ---: | --- | ---: | ---: | ---: | ---: |",
        ]
        for g in self.groups[:top]:
            lines.append(f"| {g.rank} | {g.name} | {len(g.modules)} | {g.only:.4g} | {g.all_but:.4g} | {g.recovery:.4g} |")
        p = self.proposal
        if p is not None:
            verdict = "meets" if p.met else "does NOT meet"
            lines += [
                "",
                f"**Proposed exclusions for a drop <= {p.target:g}** ({verdict} it: {p.drop:.4g}): "
                + (", ".join(f"`{g}`" for g in p.groups) or "none needed"),
            ]
        return "\n".join(lines) + "\n"


@contextmanager
def _keeping_flags(quantizers: Sequence[TensorQuantizer]):
    saved = [(q, q._disabled, q._if_calib, q._if_quant) for q in quantizers]
    try:
        yield
    finally:
        for q, disabled, if_calib, if_quant in saved:
            q._disabled, q._if_calib, q._if_quant = disabled, if_calib, if_quant


class _Bench:
    """Switches quantizers by path and measures the metric; counts measurements."""

    def __init__(
        self, model: nn.Module, metric: Metric, progress: ProgressFn | None, planned: int, always_on: Iterable[str] = ()
    ) -> None:
        self.model, self.metric, self.progress, self.planned = model, metric, progress, planned
        self.by_path = {paths[0]: q for q, paths in quantizer_paths(model)}
        self.always_on = list(always_on)
        self.count = 0

    def switch(self, quantized: Iterable[str], fp32: bool = False) -> None:
        on = set() if fp32 else {id(self.by_path[p]) for p in [*quantized, *self.always_on]}
        for q in self.by_path.values():
            q._disabled = id(q) not in on
            q._if_quant, q._if_calib = True, False

    def measure(self, quantized: Iterable[str]) -> float:
        self.switch(quantized)
        value = self.metric.drop(self.model)
        self.count += 1
        if self.progress is not None:
            self.progress(self.count, max(self.planned, self.count))
        return value


def analyse_sensitivity(
    model: nn.Module,
    groups: Sequence[QuantizerGroup],
    metric: Metric,
    *,
    target: float | None = None,
    progress: ProgressFn | None = None,
    always_on: Sequence[str] = (),
) -> SensitivityResult:
    """Rank ``groups`` by their measured drop; propose exclusions for ``target`` if given.

    ``always_on``: quantizer paths outside ``groups`` that stay quantized in every
    measurement (an analysis of some groups inside the real INT8 model); any other
    quantizer outside ``groups`` stays FP32.

    Every quantizer must hold an amax (a calibrated model; exclusions already applied are
    ignored: the analysis switches every quantizer itself and puts the flags back after).
    """
    if not groups:
        raise CalibrationError("sensitivity analysis: the model has no quantizer groups")
    missing = [p for g in groups for p in g.quantizers if not hasattr(model.get_submodule(p), "_amax")]
    if missing:
        raise CalibrationError(f"sensitivity analysis needs a calibrated model; no amax in {', '.join(missing[:10])}")
    started = time.perf_counter()
    everything = [p for g in groups for p in g.quantizers]
    bench = _Bench(model, metric, progress, 1 + 2 * len(groups), always_on)
    with _keeping_flags(list(bench.by_path.values())), torch.no_grad():
        model.eval()
        bench.switch((), fp32=True)  # FP32: every quantizer off
        metric.prepare(model)
        all_drop = bench.measure(everything)
        rows = []
        for i, g in enumerate(groups):
            only = bench.measure(g.quantizers)
            rest = [p for p in everything if p not in set(g.quantizers)]
            all_but = bench.measure(rest)
            rows.append((g, only, all_but))
            log.info("sensitivity %d/%d %s: only %.4g, all but %.4g", i + 1, len(groups), g.name, only, all_but)
        ranked = sorted(rows, key=lambda r: (-(all_drop - r[2]), -r[1]))
        result_groups = tuple(
            GroupSensitivity(g.name, g.modules, g.quantizers, only, all_but, all_drop - all_but, rank)
            for rank, (g, only, all_but) in enumerate(ranked, start=1)
        )
        proposal = None if target is None else _propose(bench, result_groups, everything, all_drop, target)
    seconds = time.perf_counter() - started
    log.info("sensitivity analysis: %d measurements in %.1f s", bench.count, seconds)
    return SensitivityResult(metric.name, len(getattr(metric, "batches", ())), all_drop, result_groups, proposal,
                             bench.count, seconds)


def _propose(
    bench: _Bench, ranked: Sequence[GroupSensitivity], everything: list[str], all_drop: float, target: float
) -> Proposal:
    def drop_without(chosen: Sequence[GroupSensitivity]) -> float:
        off = {p for g in chosen for p in g.quantizers}
        return bench.measure([p for p in everything if p not in off])

    chosen: list[GroupSensitivity] = []
    steps: list[tuple[str, float]] = []
    drop = all_drop
    for g in ranked:
        if drop <= target:
            break
        chosen.append(g)
        drop = drop_without(chosen)
        steps.append((g.name, drop))
    if drop <= target:
        for g in list(chosen[:-1]):  # put back any pick the target does not need
            trial = [c for c in chosen if c is not g]
            value = drop_without(trial)
            if value <= target:
                chosen, drop = trial, value
    return Proposal(
        target=target,
        groups=tuple(g.name for g in chosen),
        modules=tuple(m for g in chosen for m in g.modules),
        quantizers=tuple(p for g in chosen for p in g.quantizers),
        drop=drop,
        met=drop <= target,
        steps=tuple(steps),
    )


def measure_exclusions(model: nn.Module, metric: Metric, patterns: Sequence[str], prepared: bool = False) -> float:
    """The drop with every quantizer on except those under ``patterns`` (as ``--exclude`` does)."""
    paths = quantizer_paths(model)
    bench = _Bench(model, metric, None, 0)
    with _keeping_flags([q for q, _ in paths]), torch.no_grad():
        model.eval()
        if not prepared:
            bench.switch((), fp32=True)
            metric.prepare(model)
        keep = [ps[0] for q, ps in paths if not any(matches(p.rpartition(".")[0], tuple(patterns)) for p in ps)]
        return bench.measure(keep)


def disable_quantizers(model: nn.Module, quantizers: Iterable[str]) -> list[str]:
    """Switch off the quantizers at these paths (a proposal's list); returns them."""
    done = []
    for path in quantizers:
        module = model.get_submodule(path)
        if not isinstance(module, TensorQuantizer):
            raise CalibrationError(f"{path} is not a quantizer of this model")
        module.disable()
        done.append(path)
    return done
