"""The publish task: :func:`bevfusion_ptq.s3.publish_version` with Prefect retries and a link.

botocore already retries each request (5xx, throttling) within seconds; this task's retries
cover an outage that outlasts those, a minute or so later: they run on
:class:`~bevfusion_ptq.errors.TransientStorageError` (what an outage becomes) and on
unexpected errors, never on the other PTQErrors (a changed local file, a missing bucket, bad
credentials), which would fail the same way again.
"""

from __future__ import annotations

import dataclasses
import re

from prefect import task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from bevfusion_ptq.s3 import publish_version
from tasks.retries import retry_unless_input_error


@task(name="publish", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_input_error,
      cache_policy=NO_CACHE)
def publish(version_dir: str, url: str, sse: str | None = None, kms_key_id: str | None = None) -> dict:
    """Publish a saved version directory to ``url`` and link the published version."""
    logger = get_run_logger()
    try:
        result = publish_version(version_dir, url, sse=sse, kms_key_id=kms_key_id)
    except Exception as exc:
        logger.error("publishing to %s failed (%s). The local version directory %s is intact; publish it "
                     "later with: bevfusion-ptq publish %s %s", url, type(exc).__name__, version_dir, version_dir, url)
        raise
    key = "published-" + re.sub(r"[^a-z0-9-]+", "-", result.model.lower()).strip("-")
    create_link_artifact(
        link=result.url, link_text=f"{result.model} {result.version}", key=key,
        description=f"{'already published' if result.reused else 'published'} version {result.version}; "
                    f"latest {'moved' if result.latest_updated else 'unchanged'}",
    )
    logger.info("%s %s", "already published:" if result.reused else "published", result.url)
    return dataclasses.asdict(result)
