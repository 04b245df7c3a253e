"""The relabel flow: the label DAG on the current config after an expert pool changed.

Only missing cells are computed (cells are content-addressed), labels are re-aggregated over the current pool,
the router is retrained and evaluated, and it replaces the champion only if it is not worse (tasks/publish.py).
The `zooter-relabel` deployment (prefect.yaml, `zooter serve`) runs it on a schedule and on the
`zooter.experts.changed` event that `zooter experts add|remove` emits, one run at a time (a second waits).
"""

from __future__ import annotations

from prefect import flow

from flows.label import label_dag
from schemas.manifest import Outcome
from schemas.plan import RunPlan
from tasks.plan import plan_run


@flow(name="zooter-relabel", log_prints=True)
def relabel_flow(config_path: str, plan: RunPlan | None = None) -> Outcome:
    """Relabel after an expert pool change.

    Args:
        config_path: The flow config, read when the run starts on the machine that runs it: a local path there, or
            a URL such as `s3://bucket/prefix/configs/current.yaml` (endpoint and credentials from that machine's
            AWS environment). The `zooter.experts.changed` trigger passes the published copy's URL.
        plan: The config already resolved (`zooter relabel` plans it before Prefect and Ray start).
    """
    return label_dag(plan or plan_run(config_path, "relabel"))
