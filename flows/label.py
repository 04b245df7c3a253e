r"""The label flow: the whole Zooter DAG as one Prefect flow. Wiring only; every step lives in tasks/.

plan -> ingest -> generate[expert 1..N] -> score[RM 1..K] -> aggregate -> train_router -> evaluate -> publish
              \-> tag, embed ----------------------------/
(the tail from tag on: flows/tail.py, shared with the train flow)

The config is resolved once into a run plan (tasks/plan.py: preflight, every fingerprint and model identity); the
steps take its parts. After ingest every cell-producing stage starts at once, in one Pipeline (cluster/stage.py): an
RM scores a shard as soon as that shard's generation cell exists, while other experts still generate; tag and embed
need only the queries. Aggregation waits for all of them; the first failure stops every stage and fails the run.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from cluster.pool import alive_nodes, connect
from cluster.stage import Pipeline
from flows.tail import produces, records, run_scope, settle, step, submit_inputs, timed, train_tail
from schemas.manifest import Outcome, RunManifest, new_run_id, outcome
from schemas.plan import RunPlan
from schemas.store import Store
from tasks.generate import run_generate
from tasks.ingest import write_shards
from tasks.plan import plan_run
from tasks.preflight import preflight_cluster
from tasks.score import run_score


@flow(name="zooter-label", log_prints=True)
def label_flow(config_path: str, plan: RunPlan | None = None) -> Outcome:
    """Label `config_path`'s queries. `plan`: the config already resolved (`zooter run` plans before Prefect and
    Ray start, so bad input fails at once); a deployment passes the path alone and the flow plans it."""
    return label_dag(plan or plan_run(config_path, "label"))


def label_dag(plan: RunPlan) -> Outcome:
    """The DAG both flows run on a resolved plan; `relabel` is this on the current config (content-addressed cells
    make it compute only what is missing)."""
    log = get_run_logger()
    cfg = plan.config
    connect(cfg.ray)
    preflight_cluster(cfg, alive_nodes())  # e.g. a local-path store on a multi-node cluster
    store = Store.from_config(cfg.store)
    m = RunManifest(run_id=new_run_id(), flow=plan.flow)
    with run_scope(store, m, plan) as leases, Pipeline() as pipe:  # leases: the cells this run computes
        with timed(m, "ingest"):
            ing = step(write_shards, name="ingest")(store, plan.inputs, cfg.data.shard_size)
        m.shards, m.queries, m.new_queries = ing.shards, ing.n_queries, ing.n_new
        log.info("ingest: %d queries in %d shards (%d new queries)", ing.n_queries, len(ing.shards), ing.n_new)

        inputs = submit_inputs(store, m, plan, leases)
        most = cfg.data.max_failed_fraction  # rows that fail alone: more than this share fails the stage
        gens = [produces(pipe, step(run_generate, name=f"generate-{e.name}").submit(store, e, ing.shards, leases,
                                                                                    most),
                         f"generate {e.name}") for e in plan.experts]
        scores = [step(run_score, name=f"score-{rm.name}").submit(store, rm, plan.experts, ing.shards, leases, most)
                  for rm in plan.reward_models]
        try:
            settle(gens + scores + inputs.futures)
        finally:
            m.generate, m.score = records(gens), records(scores)
        log.info("generation + scoring: %d cells computed, %d reused", m.cells_computed,
                 sum(s.cells_reused for s in m.generate + m.score))
        report = train_tail(store, m, plan, leases, inputs)
    return outcome(store, m, report)
