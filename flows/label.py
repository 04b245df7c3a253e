r"""The label flow: the whole Zooter DAG as one Prefect flow. Wiring only; every step lives in tasks/.

ingest -> generate[expert 1..N] -> score[RM 1..K] -> aggregate -> train_router -> evaluate -> publish
       \-> tag, embed ----------------------------/
(the tail from tag on: flows/tail.py, shared with the train flow)

After ingest every cell-producing stage starts at once, in one Pipeline (cluster/stage.py): an RM scores a shard as
soon as that shard's generation cell exists, while other experts still generate; tag and embed need only the
queries. Aggregation waits for all of them; the first failure stops every stage and fails the run.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from cluster.pool import alive_nodes, connect
from cluster.stage import Pipeline
from flows.tail import produces, records, run_scope, settle, step, submit_inputs, timed, train_tail
from schemas.config import load_config
from schemas.manifest import Outcome, RunManifest, new_run_id, outcome, redacted
from schemas.store import Store
from tasks.aggregate import ScoreSource
from tasks.generate import expert_fingerprint, run_generate
from tasks.ingest import write_shards
from tasks.preflight import preflight, preflight_cluster
from tasks.score import rm_fingerprint, run_score


@flow(name="zooter-label", log_prints=True)
def label_flow(config_path: str) -> Outcome:
    return label_dag(config_path, "label")


def label_dag(config_path: str, flow_name: str) -> Outcome:
    """The DAG both flows run; `relabel` is this on the current config (content-addressed cells make it compute
    only what is missing)."""
    log = get_run_logger()
    cfg = load_config(config_path)
    queries = preflight(cfg)  # fails before any model loads or anything is written
    connect(cfg.ray)
    preflight_cluster(cfg, alive_nodes())  # e.g. a local-path store on a multi-node cluster
    store = Store.from_config(cfg.store)
    m = RunManifest(run_id=new_run_id(), flow=flow_name, config=redacted(cfg))
    with run_scope(store, m) as leases, Pipeline() as pipe:  # leases: the cells this run computes
        with timed(m, "ingest"):
            ing = step(write_shards, name="ingest")(store, queries, cfg.data.shard_size)
        m.shards, m.queries, m.new_queries = ing.shards, ing.n_queries, ing.n_new
        log.info("ingest: %d queries in %d shards (%d new queries)", ing.n_queries, len(ing.shards), ing.n_new)

        inputs = submit_inputs(store, m, cfg, leases)
        gens = [produces(pipe, step(run_generate, name=f"generate-{e.name}").submit(store, e, ing.shards, leases),
                         f"generate {e.name}") for e in cfg.experts]
        scores = [step(run_score, name=f"score-{rm.name}").submit(store, rm, cfg.experts, ing.shards, leases)
                  for rm in cfg.reward_models]
        try:
            settle(gens + scores + inputs.futures)
        finally:
            m.generate, m.score = records(gens), records(scores)
        log.info("generation + scoring: %d cells computed, %d reused", m.cells_computed,
                 sum(s.cells_reused for s in m.generate + m.score))

        experts = [(e.name, expert_fingerprint(e)) for e in cfg.experts]
        sources = [ScoreSource(rm.name, rm_fingerprint(rm), rm.weight) for rm in cfg.reward_models]
        report = train_tail(store, m, cfg, experts, sources, cfg.data.test_fraction, leases, inputs)
    return outcome(store, m, report)
