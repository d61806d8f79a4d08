"""FP32 | INT8 | delta tables and a markdown page with the devkit's plots embedded.

Prefect's UI shows markdown artifacts in the browser, which does not load ``file://``
images; the plots are therefore embedded as base64 ``data:`` URIs, so the page renders
wherever the UI runs.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bevfusion_ptq.evaluation.metrics import TP_ERROR_NAMES

#: Overall metrics in table order: (label, summary key or TP error key).
_OVERALL: tuple[tuple[str, str], ...] = (("mAP", "mean_ap"), ("NDS", "nd_score")) + tuple(
    (short, key) for key, short in TP_ERROR_NAMES.items()
)


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, recursively: strict JSON.

    The devkit reports a TP error it cannot compute (a class without matches, or an error a
    class does not have) as NaN, which ``json.dumps`` would write as a bare ``NaN``.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _value(summary: Mapping[str, Any], key: str) -> float | None:
    value = summary.get(key, summary.get("tp_errors", {}).get(key))
    return None if value is None else float(value)


def _row(metric: str, fp32: float | None, int8: float | None) -> dict[str, Any]:
    delta = None if fp32 is None or int8 is None else int8 - fp32
    return {"metric": metric, "fp32": fp32, "int8": int8, "delta": delta}


def comparison_rows(fp32: Mapping[str, Any], int8: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per overall metric (mAP, NDS, the five TP errors) and per class AP.

    Values are the devkit's (fractions; errors in metres, radians, 1-IoU, m/s, 1-accuracy);
    ``delta`` is INT8 minus FP32. Class rows are named ``AP <class>``.
    """
    rows = [_row(label, _value(fp32, key), _value(int8, key)) for label, key in _OVERALL]
    for name in sorted(fp32.get("mean_dist_aps", {})):
        rows.append(_row(f"AP {name}", fp32["mean_dist_aps"][name], int8.get("mean_dist_aps", {}).get(name)))
    return rows


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or value != value:  # None or NaN (a TP error of a class without matches)
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def comparison_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| metric | FP32 | INT8 | Δ (INT8 − FP32) |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['metric']} | {_fmt(r['fp32'])} | {_fmt(r['int8'])} | {_fmt(r['delta'], signed=True)} |")
    return "\n".join(lines) + "\n"


def embedded_image(path: str | Path, alt: str) -> str:
    """A markdown image whose source is the PNG itself (base64 data URI)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"![{alt}](data:image/png;base64,{data})"


def plots_markdown(plots: Mapping[str, Sequence[str | Path]], title: str) -> str:
    """A page with each precision's plots embedded, headed by precision and plot name."""
    lines = [f"# {title}", ""]
    for precision, paths in plots.items():
        lines += [f"## {precision.upper()}", ""]
        for path in paths:
            name = Path(path).stem
            lines += [f"### {name}", "", embedded_image(path, f"{precision} {name}"), ""]
    return "\n".join(lines)
