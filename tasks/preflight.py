"""The input checks as the flow's first task: a deployment run from the UI or an event gets
the same early, one-line failures as the CLI (which runs them before starting Prefect)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from bevfusion_ptq import preflight
from bevfusion_ptq.params import PTQParams


@task(name="check-inputs", cache_policy=NO_CACHE, retries=0)
def check_inputs(params: PTQParams) -> None:
    """Config, checkpoint, data root and output (an S3 write probe) before any work."""
    preflight.check_inputs(params)
