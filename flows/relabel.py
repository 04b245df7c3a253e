"""The relabel flow: the label DAG on the current config after an expert pool changed, or on served traffic.

Only missing cells are computed (cells are content-addressed), labels are re-aggregated over the current pool,
the router is retrained and evaluated, and it replaces the champion only if it is not worse (tasks/publish.py).
With `traffic`, the queries the recording gateway kept (`zooter gateway --record`) that no shard holds yet are
ingested first as new shards (tasks/traffic.py), so every expert answers them and every reward model, user
feedback included (`kind: feedback`), scores them. The `zooter-relabel` deployment (prefect.yaml, `zooter serve`)
runs it on a schedule, on the `zooter.experts.changed` event that `zooter experts add|remove` emits, and with
`traffic` on the `zooter.traffic.recorded` event the recording gateway emits; one run at a time (a second waits).
"""

from __future__ import annotations

import datetime as dt

from prefect import flow, get_run_logger

from flows.label import label_dag
from flows.tail import step
from schemas.manifest import Outcome
from schemas.plan import RunPlan
from schemas.store import Store
from tasks.plan import plan_run
from tasks.traffic import ingest_traffic


@flow(name="zooter-relabel", log_prints=True)
def relabel_flow(config_path: str, plan: RunPlan | None = None, traffic: bool = False,
                 since: dt.datetime | None = None, max_queries: int | None = None) -> Outcome:
    """Relabel after an expert pool change, or with served traffic.

    Args:
        config_path: The flow config, read when the run starts on the machine that runs it: a local path there, or
            a URL such as `s3://bucket/prefix/configs/current.yaml` (endpoint and credentials from that machine's
            AWS environment). The triggers pass the published copy's URL.
        plan: The config already resolved (`zooter relabel` plans it before Prefect and Ray start).
        traffic: First ingest the recorded queries that no shard holds yet.
        since: With `traffic`: only queries routed at or after this time.
        max_queries: With `traffic`: at most this many new queries (the first routed first).
    """
    plan = plan or plan_run(config_path, "relabel")
    if traffic:
        cfg = plan.config
        got = step(ingest_traffic, name="ingest-traffic")(Store.from_config(cfg.store), cfg.data.shard_size, since,
                                                          max_queries)
        get_run_logger().info("traffic: %d new queries from %d recorded requests (shards %s)", got.added,
                              got.recorded, got.new_shards)
    return label_dag(plan)
