"""The sensitivity analysis' Prefect artifacts: the ranked table and the chart.

Made from ``sensitivity.json`` on every run, cached or not, like the run's other artifacts.
The chart is embedded in a markdown artifact as a data URI: the UI cannot load the worker's
``file://`` paths.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from bevfusion_ptq.pipeline import SensitivityRef


@task(name="sensitivity-report", cache_policy=NO_CACHE)
def sensitivity_report(ref: SensitivityRef) -> None:
    result = json.loads(Path(ref.path).read_text())
    create_table_artifact(
        table=[
            {"rank": g["rank"], "group": g["name"], "layers": len(g["modules"]), "only": g["only"],
             "all_but": g["all_but"], "recovery": g["recovery"]}
            for g in result["groups"]
        ],
        key="sensitivity",
        description=f"{len(result['groups'])} quantizer groups by {result['metric']}, most sensitive first",
    )
    create_markdown_artifact(ref.markdown, key="sensitivity-chart", description="most sensitive groups and the proposed exclusions")
