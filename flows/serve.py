"""The deployments as Prefect objects: served from one process, and the event that starts them.

``deployments/prefect.yaml`` is the one description of the deployments. ``prefect deploy``
sends it to worker pools; :func:`serve_deployments` reads the same file and serves its
deployments from this process (schedules, triggers, limits, tags; no pool, no worker), so
the one-box set-up cannot drift from the GPU-host one. :func:`announce_checkpoint` emits the
event that the ``ptq-on-demand`` trigger listens for.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Any

import yaml
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentTriggerTypes, Event
from prefect.events.clients import get_events_client
from prefect.schedules import Cron
from prefect.settings import get_current_settings
from pydantic import TypeAdapter

from bevfusion_ptq.errors import ConfigError
from bevfusion_ptq.params import PTQParams

log = logging.getLogger(__name__)

PREFECT_FILE = Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml"
CHECKPOINT_EVENT = "bevfusion.checkpoint.created"
_TRIGGERS: TypeAdapter[DeploymentTriggerTypes] = TypeAdapter(DeploymentTriggerTypes)


def require_api() -> str:
    """The configured API URL; serving and events need a real server, not the ephemeral one.

    An ephemeral API lives only as long as this process and cannot be reached by the
    process that announces a checkpoint, so we refuse instead of serving into the void.
    """
    url = get_current_settings().api.url
    if not url:
        raise ConfigError(
            "no Prefect API configured: start `prefect server start` and set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api)"
        )
    return url


def load_deployment_specs(path: Path = PREFECT_FILE) -> list[dict[str, Any]]:
    """The ``deployments:`` entries of a prefect.yaml."""
    if not path.is_file():
        raise ConfigError(f"deployment file not found: {path} (pass --prefect-file)")
    doc = yaml.safe_load(path.read_text()) or {}
    specs = doc.get("deployments") or []
    if not specs:
        raise ConfigError(f"no deployments in {path}")
    return specs


def _schedules(spec: dict[str, Any]) -> list[Cron]:
    """Cron schedules only: the file uses nothing else, and a silent skip would lose runs."""
    out = []
    for item in spec.get("schedules") or []:
        if "cron" not in item:
            raise ConfigError(f"deployment {spec['name']}: only cron schedules can be served, got {item}")
        out.append(Cron(item["cron"], timezone=item.get("timezone"), active=item.get("active", True)))
    return out


def _concurrency(spec: dict[str, Any]) -> int | ConcurrencyLimitConfig | None:
    limit = spec.get("concurrency_limit")
    if isinstance(limit, dict):
        return ConcurrencyLimitConfig(**limit)
    return limit


def runner_deployments(path: Path = PREFECT_FILE) -> list[RunnerDeployment]:
    """One served deployment per prefect.yaml entry, with the file's settings."""
    from flows.ptq import ptq  # the flow imports torch; only load it when serving

    out = []
    for spec in load_deployment_specs(path):
        out.append(
            ptq.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                parameters=spec.get("parameters") or {},
                schedules=_schedules(spec),
                concurrency_limit=_concurrency(spec),
                enforce_parameter_schema=spec.get("enforce_parameter_schema", True),
                triggers=[_TRIGGERS.validate_python(t) for t in spec.get("triggers") or []],
            )
        )
    return out


def serve_deployments(path: Path = PREFECT_FILE, limit: int | None = None) -> None:
    """Register the deployments and run their flow runs here until interrupted."""
    from prefect import serve

    require_api()
    serve(*runner_deployments(path), limit=limit)


def checkpoint_event(url: str, params: PTQParams) -> Event:
    """The event the ``ptq-on-demand`` trigger matches.

    The resource id hashes the URL (ids are matched with globs, URLs hold ``*``-unsafe
    characters); its name is the URL, which is what the UI shows. ``params`` carries only
    the fields the announcer set, so the run takes PTQParams' defaults for the rest.
    """
    overrides = params.model_dump(mode="json", exclude_unset=True)
    overrides.pop("checkpoint", None)
    return Event(
        event=CHECKPOINT_EVENT,
        resource={
            "prefect.resource.id": f"bevfusion.checkpoint.{hashlib.sha256(url.encode()).hexdigest()[:16]}",
            "prefect.resource.name": url,
        },
        payload={"checkpoint": url, "params": overrides},
    )


async def _emit(event: Event) -> None:
    async with get_events_client() as client:
        await client.emit(event)


def announce_checkpoint(url: str, params: PTQParams) -> Event:
    """Emit ``bevfusion.checkpoint.created`` for ``url`` and return the event sent."""
    require_api()
    event = checkpoint_event(url, params)
    asyncio.run(_emit(event))
    log.info("emitted %s %s for %s", event.event, event.id, url)
    return event
