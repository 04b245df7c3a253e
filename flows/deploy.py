"""Deployments of the label and relabel flows, served from a local process (`zooter serve`): for users without
a work pool. prefect.yaml declares the same two deployments for `prefect deploy`.

The relabel deployment runs on a cron schedule (in UTC), whenever `zooter experts add|remove` emits
`zooter.experts.changed` for this config's store, and with `traffic` whenever the recording gateway (`zooter
gateway --record`) emits `zooter.traffic.recorded` for it (every `traffic.relabel_after` new queries); each trigger
passes the event's `config_url` (a config published into the store) to the flow, which reads it when it runs.
At most one relabel run runs at a time; a second one (the nightly run during an event-triggered one, or two quick
pool edits) waits for the slot (ENQUEUE) instead of being dropped (CANCEL_NEW), so no pool change goes unlabelled.
"""

from __future__ import annotations

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron

from flows.label import label_flow
from flows.relabel import relabel_flow
from schemas.config import load_config
from schemas.traffic import EVENT as TRAFFIC_EVENT
from tasks.experts import EVENT

RELABEL_CRON = "0 3 * * *"  # nightly (03:00 UTC): picks up new queries in the data file as well
# Two relabel runs at once would race to promote a champion: one at a time, the next waits (prefect.yaml: the same).
RELABEL_CONCURRENCY = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def relabel_trigger(store_url: str | None = None) -> DeploymentEventTrigger:
    """Fires once per `zooter.experts.changed` event (for one store, or any with None)."""
    return DeploymentEventTrigger(
        name="relabel on expert pool change", expect={EVENT},
        match={"prefect.resource.id": f"zooter.store.{store_url}" if store_url else "zooter.store.*"},
        parameters={"config_path": "{{ event.payload.config_url }}"})


def traffic_trigger(store_url: str | None = None) -> DeploymentEventTrigger:
    """Fires once per `zooter.traffic.recorded` event: relabel with the recorded queries (`relabel --traffic`)."""
    return DeploymentEventTrigger(
        name="relabel on recorded traffic", expect={TRAFFIC_EVENT},
        match={"prefect.resource.id": f"zooter.store.{store_url}" if store_url else "zooter.store.*"},
        parameters={"config_path": "{{ event.payload.config_url }}", "traffic": True})


def deployments(config_path: str, cron: str | None = RELABEL_CRON) -> list[RunnerDeployment]:
    """The label deployment (on demand) and the relabel one (`cron` in UTC, None: no schedule; both triggers; one
    run at a time). Served from this machine: `config_path` may be a local path here (the event-triggered runs get the
    config's published URL)."""
    cfg = load_config(config_path)
    params = {"config_path": config_path}
    schedule = Cron(cron, timezone="UTC") if cron else None  # explicit: a reader need not know Prefect's default
    return [label_flow.to_deployment(name="label", parameters=params),
            relabel_flow.to_deployment(name="relabel", parameters=params, schedule=schedule,
                                       triggers=[relabel_trigger(cfg.store.url), traffic_trigger(cfg.store.url)],
                                       concurrency_limit=RELABEL_CONCURRENCY)]


def serve_deployments(config_path: str, cron: str | None = RELABEL_CRON, limit: int | None = None) -> None:
    """Blocks: registers both deployments (and the relabel trigger's automation) and runs their flow runs."""
    serve(*deployments(config_path, cron), limit=limit)
