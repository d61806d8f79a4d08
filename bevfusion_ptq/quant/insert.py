"""Apply a :class:`~bevfusion_ptq.quant.rules.RuleSet` to a model, in place."""

from __future__ import annotations

import difflib
import fnmatch
import logging
from dataclasses import asdict, dataclass

from pytorch_quantization.nn import TensorQuantizer
from torch import nn

from bevfusion_ptq.errors import QuantizationRuleError
from bevfusion_ptq.quant.modules import is_quantized
from bevfusion_ptq.quant.rules import Quant, Rule, RuleSet, ShareGroup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedModule:
    """One module the rules replaced: where, by which rule, with which descriptors."""

    path: str
    rule: str
    float_type: str
    quant_type: str
    input: Quant
    weight: Quant | None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class QuantPlan:
    """What :func:`insert_quantizers` did; the input to review before spending GPU time."""

    rule_set: str
    modules: tuple[PlannedModule, ...]
    exclude: tuple[str, ...]
    share: tuple[ShareGroup, ...] = ()


def matches(path: str, patterns: tuple[str, ...]) -> bool:
    """Glob match of a module path against any pattern; a pattern also covers its subtree."""
    return any(fnmatch.fnmatchcase(path, p) or path.startswith(p + ".") for p in patterns)


def _rule_for(path: str, module: nn.Module, rules: tuple[Rule, ...]) -> Rule | None:
    for rule in rules:
        if type(module) in rule.types and matches(path, rule.paths):
            return rule
    return None


def insert_quantizers(model: nn.Module, rules: RuleSet) -> QuantPlan:
    """Swap every module a rule matches for its quantized class, in one walk of the model.

    Raises :class:`QuantizationRuleError` naming each required rule that matched nothing, so a
    model the rules were not written for (another backbone, a camera-only model) fails with
    the rule's name instead of an AttributeError deep inside a forward.
    """
    planned: list[PlannedModule] = []
    used: set[str] = set()
    # Materialise first: we mutate the tree while walking it.
    for path, module in list(model.named_modules()):
        if not path or is_quantized(module) or matches(path, rules.keep_float):
            continue
        rule = _rule_for(path, module, rules.rules)
        if rule is None:
            continue
        weight = None if rule.weight is None else rule.weight.descriptor()
        quant = rule.quantize(module, rule.input.descriptor(), weight)
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, quant)
        used.add(rule.name)
        planned.append(
            PlannedModule(path, rule.name, type(module).__name__, type(quant).__name__, rule.input, rule.weight)
        )
    unmatched = [r.name for r in rules.rules if r.required and r.name not in used]
    if unmatched:
        raise QuantizationRuleError(
            f"rule set {rules.name!r}: rule(s) {', '.join(unmatched)} matched no module of "
            f"{type(model).__name__}; the rules do not fit this model"
        )
    # Block-local sharing (e.g. a Bottleneck's conv1/downsample/identity) once every conv
    # inside the block carries its quantizers, then the rule set's cross-module groups.
    for path, module in model.named_modules():
        share_local = getattr(module, "share_quantizers", None)
        if callable(share_local):
            share_local(path)
    for group in rules.share:
        share_quantizers(model, group)
    log.info("inserted quantizers into %d modules (rule set %s)", len(planned), rules.name)
    return QuantPlan(rules.name, tuple(planned), rules.exclude, rules.share)


def share_quantizers(model: nn.Module, group: ShareGroup, attr: str = "_input_quantizer") -> None:
    """Make every member of ``group`` use the first member's quantizer object.

    Every reference to a member's old quantizer anywhere in the model is replaced, not only
    the member's own attribute, so a quantizer that was already shared inside a block (a
    Bottleneck identity reusing conv1's) follows the group.
    """
    quantizers = []
    for path in group.members:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise QuantizationRuleError(
                f"share group {group.name!r}: module {path!r} does not exist in {type(model).__name__}"
            ) from None
        quantizer = getattr(module, attr, None)
        if not isinstance(quantizer, TensorQuantizer):
            raise QuantizationRuleError(
                f"share group {group.name!r}: {path!r} ({type(module).__name__}) has no {attr}; "
                "no rule quantized it"
            )
        quantizers.append(quantizer)
    leader, old = quantizers[0], {id(q) for q in quantizers[1:] if q is not quantizers[0]}
    for owner in list(model.modules()):
        for name, child in list(owner._modules.items()):
            if id(child) in old:
                owner._modules[name] = leader


def apply_exclusions(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Disable every quantizer inside modules matching ``patterns``; returns the disabled paths.

    A pattern that matches no quantized module is logged: it usually means a typo in a
    user's ``--exclude``.
    """
    disabled: list[str] = []
    for pattern in patterns:
        hit = False
        # Every path, not just the first: a shared quantizer is excluded through any of them.
        for path, module in model.named_modules(remove_duplicate=False):
            if isinstance(module, TensorQuantizer) and matches(path.rpartition(".")[0], (pattern,)):
                module.disable()
                disabled.append(path)
                hit = True
        if not hit:
            log.warning("exclusion %r matches no quantized module%s", pattern, _closest(model, pattern))
    return disabled


def _quantized_paths(model: nn.Module) -> list[str]:
    """Paths of the modules that own a quantizer (what an exclusion pattern is matched with)."""
    return sorted({
        path.rpartition(".")[0] for path, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, TensorQuantizer)
    })


def _closest(model: nn.Module, pattern: str) -> str:
    close = difflib.get_close_matches(pattern, _quantized_paths(model), n=3, cutoff=0.5)
    return f"; closest quantized modules: {', '.join(close)}" if close else ""


def warn_unmatched_exclusions(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Log each pattern that matches no quantized module, with the closest module paths.

    Called right after the quantizers are inserted, so a typo in ``--exclude`` shows before
    calibration rather than after it. Returns the unmatched patterns.
    """
    paths = _quantized_paths(model)
    unmatched = [p for p in patterns if not any(matches(path, (p,)) for path in paths)]
    for pattern in unmatched:
        log.warning("exclusion %r matches no quantized module%s", pattern, _closest(model, pattern))
    return unmatched
