"""The gate before publishing: a pure function of (measurements, thresholds) -> verdict.

A calibration that lost half the detections must not become ``latest``. The gate compares
what the run measured with what the user allows:

- **mAP drop** and **NDS drop** of INT8 against FP32, in points (0-100 scale), from the
  nuScenes evaluation. The defaults (0.5 each) are about twice the drops NVIDIA reports for
  its ResNet50 PTQ (67.89 -> 67.66 mAP, 70.98 -> 70.81 NDS).
- **Fidelity cosine**: the lowest cosine similarity of INT8 against FP32 at any stage
  boundary (the fidelity report's ``min_cosine``), a cheap check that needs no labels.

A threshold of ``None`` turns its check off; with all three off the gate is *skipped*. A set
threshold whose measurement is missing (evaluation or fidelity switched off) cannot be
checked and is recorded as such: it does not fail the run, and when nothing at all could be
checked the verdict is *skipped* too. What a failed verdict means (no publish, a failed run)
is the caller's decision; this module only judges.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

Status = Literal["passed", "failed", "skipped"]
_EPS = 1e-9  # drops are differences of floats: equal to the limit must pass


@dataclass(frozen=True)
class GateThresholds:
    """What the user allows; ``None`` switches a check off."""

    max_map_drop: float | None = 0.5  # points
    max_nds_drop: float | None = 0.5  # points
    min_cosine: float | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.max_map_drop, self.max_nds_drop, self.min_cosine))


@dataclass(frozen=True)
class GateCheck:
    """One check. ``passed`` is None when it was not made (no threshold or no measurement);
    ``excess`` is by how much the measurement is on the wrong side of the limit (> 0 only
    for a failed check), in the measurement's unit."""

    name: str
    measured: float | None
    limit: float | None
    passed: bool | None
    excess: float | None
    note: str

    def line(self) -> str:
        if self.passed is None:
            return f"{self.name}: not checked ({self.note})"
        verb = "ok" if self.passed else "FAILED"
        return f"{self.name} {self.measured:.4g} {self.note} {self.limit:.4g}: {verb}" + (
            "" if self.passed else f" (by {self.excess:.4g})"
        )


@dataclass(frozen=True)
class GateVerdict:
    status: Status
    checks: tuple[GateCheck, ...]
    thresholds: GateThresholds

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def reason(self) -> str:
        """One line: the failed checks, or why the gate passed or was skipped."""
        if self.status == "failed":
            return "; ".join(c.line() for c in self.checks if c.passed is False)
        if self.status == "skipped":
            return "gate skipped: " + (
                "every threshold is none" if not self.thresholds.any else "no threshold could be checked"
            )
        return "; ".join(c.line() for c in self.checks if c.passed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "thresholds": asdict(self.thresholds),
            "checks": [asdict(c) for c in self.checks],
        }


def _drop_check(name: str, fp32: float | None, int8: float | None, limit: float | None, missing: str) -> GateCheck:
    if limit is None:
        return GateCheck(name, None, None, None, None, "threshold is none")
    if fp32 is None or int8 is None:
        return GateCheck(name, None, limit, None, None, missing)
    drop = 100.0 * (float(fp32) - float(int8))
    ok = drop <= limit + _EPS
    return GateCheck(name, drop, limit, ok, None if ok else drop - limit,
                     f"points (FP32 {100 * fp32:.2f} -> INT8 {100 * int8:.2f}), allowed at most")  # fmt: skip


def gate_verdict(
    fp32: Mapping[str, Any] | None,
    int8: Mapping[str, Any] | None,
    fidelity: Mapping[str, Any] | None,
    thresholds: GateThresholds,
) -> GateVerdict:
    """Judge a run.

    ``fp32`` and ``int8`` are nuScenes metric summaries with ``mean_ap`` and ``nd_score``
    (fractions, as the devkit reports them), or None when the evaluation was off;
    ``fidelity`` is the fidelity summary with ``min_cosine``, or None/empty when it was off.
    """
    def value(metrics: Mapping[str, Any] | None, key: str) -> float | None:
        return None if not metrics or metrics.get(key) is None else float(metrics[key])

    no_eval = "evaluation switched off (--eval-samples 0)"
    checks = [
        _drop_check("mAP drop", value(fp32, "mean_ap"), value(int8, "mean_ap"), thresholds.max_map_drop, no_eval),
        _drop_check("NDS drop", value(fp32, "nd_score"), value(int8, "nd_score"), thresholds.max_nds_drop, no_eval),
    ]
    cosine = value(fidelity, "min_cosine")
    limit = thresholds.min_cosine
    if limit is None:
        checks.append(GateCheck("fidelity cosine", None, None, None, None, "threshold is none"))
    elif cosine is None:
        checks.append(GateCheck("fidelity cosine", None, limit, None, None, "fidelity report switched off"))
    else:
        ok = float(cosine) >= limit - _EPS
        checks.append(GateCheck("fidelity cosine", float(cosine), limit, ok, None if ok else limit - float(cosine),
                                "(lowest over stages), required at least"))  # fmt: skip
    made = [c for c in checks if c.passed is not None]
    status: Status = "skipped" if not made else ("failed" if any(c.passed is False for c in made) else "passed")
    return GateVerdict(status, tuple(checks), thresholds)
