"""The run's Prefect artifacts: quantizer status table, summary markdown, histogram plots.

Made from the saved version directory on every run, cached or not, so the UI of a run that
reused everything still shows what it produced. Every artifact has a key (its title in the
UI) and a description that says what it is.

The histogram plots are embedded in a markdown artifact as ``data:`` URIs: an image artifact
only holds a URL, and a ``file://`` URL of the worker's disk is a broken image in any browser
(and unreachable from another host). A few plots of ~50 KB each fit an artifact well.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from bevfusion_ptq.artifacts import SavedVersion
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline import FidelityRef



def compact_amax(row: dict[str, Any]) -> str:
    """A per-tensor amax, or a per-channel one as min/median/max: one short cell either way
    (a whole per-channel list made the table 85 000 px wide)."""
    if row.get("amax_max") is None:
        return "-"
    if row.get("axis") is None and not isinstance(row.get("amax"), list):
        return f"{row['amax']:.4g}"
    return f"{row['amax_min']:.3g}/{row['amax_median']:.3g}/{row['amax_max']:.3g}"


def _how(row: dict[str, Any]) -> str:
    """Bits (when not 8), granularity and amax method in one cell; "off" for a disabled one."""
    if not row["enabled"]:
        return "off"
    bits = "" if row["num_bits"] == 8 else f"{row['num_bits']}b "
    axis = "tensor" if row["axis"] is None else f"axis {row['axis']}"
    return f"{bits}{axis} {row['method'] or row['calibrator']}"


def _group(row: dict[str, Any]) -> str:
    """The share group; a residual group named after its own block is just "residual"."""
    group = row["share_group"] or ""
    return "residual" if group.startswith("residual:") and row["name"].startswith(group[9:] + ".") else group


def status_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The quantizer-status rows as four short cells, name and amax first: at 1400 px the
    Prefect UI leaves ~840 px for the table, where those two show without scrolling (the
    full descriptors are in the version's quantizers.json)."""
    return [{"quantizer": r["name"], "amax": compact_amax(r), "quantization": _how(r), "shared": _group(r)} for r in rows]


def histograms_markdown(plots: list[Path]) -> str:
    """The plots as inline ``data:`` images under their quantizer names."""
    parts = ["# Activation histograms with the chosen amax", ""]
    for plot in plots:
        encoded = base64.b64encode(plot.read_bytes()).decode()
        parts += [f"## {plot.stem}", "", f"![{plot.stem}](data:image/png;base64,{encoded})", ""]
    return "\n".join(parts)


def _summary_markdown(
    params: PTQParams, saved: SavedVersion, fidelity: FidelityRef, timings: dict[str, float], published: dict[str, Any]
) -> str:
    m = saved.manifest
    inputs = m.get("inputs", {})
    lines = [
        f"# {m['model']} version `{m['version']}`",
        "",
        (f"- **not published**: the gate held it back ({m.get('gate', {}).get('reason')})" if published.get("held")
         else f"- published: `{published.get('url', saved.path)}`" + (" (already there)" if published.get("reused") else "")),
        f"- gate: {m.get('gate', {}).get('status', 'n/a')}" + (f" ({m['gate']['reason']})" if m.get("gate") else ""),
        f"- local copy: `{saved.path}`",
        f"- package {m.get('package_version')}, git commit `{m.get('git_commit') or 'n/a'}`, created {m['created_at']}",
        f"- checkpoint: `{inputs.get('checkpoint')}` (sha256 `{str(inputs.get('checkpoint_sha256'))[:16]}…`)",
        f"- config: `{params.config}` (sha256 `{str(inputs.get('config_sha256'))[:16]}…`)",
        f"- dataset fingerprint: `{str(inputs.get('dataset_fingerprint'))[:16]}…`"
        + (" (generated)" if inputs.get("dataset_generated") else ""),
        f"- calibration: {params.calib_method}, {inputs.get('calibration', {}).get('batches')} batches, "
        f"{params.calib_sampling} sampling, "
        f"{params.calib_pipeline} pipeline, excluded {', '.join(params.exclude) or 'nothing'}",
        "",
        "## Stage timings (s; a cached stage takes well under a second)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {name} | {seconds:.2f} |" for name, seconds in timings.items()),
        "",
        "## Fidelity",
        "",
        fidelity.markdown,
    ]
    return "\n".join(lines) + "\n"


@task(name="report", cache_policy=NO_CACHE)
def report(
    params: PTQParams, saved: SavedVersion, fidelity: FidelityRef, timings: dict[str, float], published: dict[str, Any]
) -> None:
    rows = json.loads((Path(saved.path) / "quantizers.json").read_text())
    name = f"{saved.manifest['model']} {saved.manifest['version']}"
    create_table_artifact(
        table=status_table(rows), key="quantizer-status",
        description=f"Quantizer status: {len(rows)} quantizers of {name}; amax per tensor, or min/median/max "
                    "over the channels",
    )
    create_markdown_artifact(
        _summary_markdown(params, saved, fidelity, timings, published), key="ptq-summary",
        description=f"Run summary of {name}: inputs, versions, stage timings and fidelity",
    )
    plots = sorted((Path(saved.path) / "plots").glob("*.png"))
    if plots:
        create_markdown_artifact(
            histograms_markdown(plots), key="activation-histograms",
            description=f"Activation histograms of {name}: {len(plots)} quantizers with the chosen amax",
        )
