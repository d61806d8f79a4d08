"""The run's Prefect artifacts: quantizer status table, summary markdown, histogram plots.

Made from the saved version directory on every run, cached or not, so the UI of a run that
reused everything still shows what it produced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from bevfusion_ptq.artifacts import SavedVersion
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline import FidelityRef

_TABLE_COLUMNS = ("name", "share_group", "enabled", "num_bits", "axis", "calibrator", "method", "amax", "amax_min", "amax_median", "amax_max", "auto")


def _summary_markdown(
    params: PTQParams, saved: SavedVersion, fidelity: FidelityRef, timings: dict[str, float], published: dict[str, Any]
) -> str:
    m = saved.manifest
    inputs = m.get("inputs", {})
    lines = [
        f"# {m['model']} version `{m['version']}`",
        "",
        f"- published: `{published.get('url', saved.path)}`" + (" (already there)" if published.get("reused") else ""),
        f"- local copy: `{saved.path}`",
        f"- package {m.get('package_version')}, git commit `{m.get('git_commit') or 'n/a'}`, created {m['created_at']}",
        f"- checkpoint: `{inputs.get('checkpoint')}` (sha256 `{str(inputs.get('checkpoint_sha256'))[:16]}…`)",
        f"- config: `{params.config}` (sha256 `{str(inputs.get('config_sha256'))[:16]}…`)",
        f"- dataset fingerprint: `{str(inputs.get('dataset_fingerprint'))[:16]}…`"
        + (" (generated)" if inputs.get("dataset_generated") else ""),
        f"- calibration: {params.calib_method}, {params.calib_batches} batches, {params.calib_sampling} sampling, "
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
    create_table_artifact(
        table=[{c: json.dumps(r.get(c)) if isinstance(r.get(c), (list, dict)) else r.get(c) for c in _TABLE_COLUMNS} for r in rows],
        key="quantizer-status",
        description=f"{len(rows)} quantizers of {saved.manifest['model']} {saved.manifest['version']}",
    )
    create_markdown_artifact(
        _summary_markdown(params, saved, fidelity, timings, published), key="ptq-summary",
        description="inputs, versions, stage timings and fidelity of this run",
    )
    for plot in sorted((Path(saved.path) / "plots").glob("*.png")):
        create_image_artifact(
            image_url=plot.resolve().as_uri(),
            description=f"activation histogram with the chosen amax: {plot.stem}",
        )
