"""Record a re-run that found its version already published, as a flow run of its own.

The CLI's fast path (:mod:`bevfusion_ptq.rerun`) answers without running the flow. With a
Prefect API configured (``PREFECT_API_URL``), the answer is still recorded there: a
Completed run of the ``bevfusion-ptq`` flow with the run's parameters and a link to the
published version, so the UI's history shows every run. With no API configured nothing is
started for it: a temporary Prefect server costs 7-12 s, far more than the re-run itself.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from bevfusion_ptq.params import PTQParams

log = logging.getLogger("bevfusion_ptq.cli")

FLOW_NAME = "bevfusion-ptq"


def record_rerun(params: PTQParams, published: dict[str, Any]) -> str | None:
    """The id of the Completed flow run recorded for this re-run; None without an API."""
    if not os.environ.get("PREFECT_API_URL"):
        log.debug("no PREFECT_API_URL: the re-run is not recorded as a flow run")
        return None
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.states import Completed

    message = f"already published at {published['url']}, nothing recomputed"
    stand_in = Flow(fn=_stand_in, name=FLOW_NAME)  # only its name is sent
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(
            stand_in, parameters={"params": params.model_dump(mode="json")},
            state=Completed(message=message), tags=["rerun", "nothing-recomputed"],
        )
        client.create_artifact(ArtifactCreate(
            key=f"published-{published['model']}", type="markdown", flow_run_id=run.id,
            description="the version this run would have produced, already published",
            data=f"# {published['model']} version `{published['version']}`\n\n{message}.\n\n"
                 f"First published by flow run `{published.get('flow_run_id')}`.\n",
        ))
    return str(run.id)


def _stand_in(params: PTQParams) -> None:
    """Never called: the recorded run's flow is the real ``bevfusion-ptq`` flow, by name."""
