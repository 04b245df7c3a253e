"""publish: champion/challenger. The run's router (the challenger) becomes the store's champion (the champion record,
the one `zooter route` uses) only if it is not worse than the current champion on a *validation* slice: training
queries the router did not fit (tasks.aggregate.train_val, drawn by its seed). The test split only reports:
choosing on the split that is reported would inflate the reported number.

The comparison is the mean combined reward of the routed answers:
- same labels and the same validation slice (same seed): both routers' evaluations already hold that number
  (`EvalReport.validation`, `Champion.val_reward`);
- otherwise (the pool, the data or the seed changed, or a champion record from before validation-only promotion,
  or from before train_router took the tag prior from the fitted rows: `Champion.val_unseen`): both routers are run
  again on the challenger's validation queries that the champion did not train on either (queries of its own
  labels' train split outside its own validation slice are left out; all of them for a champion whose targets'
  prior averaged over that whole split, which then cannot be measured on a slice of it), and each query is charged
  the reward of the expert it picks in the challenger's labels. The champion can only pick experts that are still
  in the pool: where its favourite was removed, its next-best available one counts. Both routers are thus judged on
  the same queries, the same answers and the same reward scale, and neither has seen those queries.
A tie promotes the challenger ("not worse"), so a rerun on new data keeps the champion fresh.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import polars as pl

from schemas.artifacts import CHAMPION_PATH, LABELS, evaluation_dir, labels_path, router_dir
from schemas.evaluation import Champion, EvalReport, read_champion
from schemas.leases import Leases
from schemas.manifest import ChampionDecision
from schemas.plan import LabelsRef
from schemas.store import Store
from tasks.aggregate import train_val


def _labels(store: Store, labels_fp: str) -> tuple[pl.DataFrame, list[str]]:
    return (pl.from_arrow(store.read_table(labels_path(labels_fp), LABELS)),
            store.read_meta(labels_path(labels_fp))["experts"])


def reward_on(router, rows: pl.DataFrame, names: list[str]) -> float | None:
    """A loaded router's mean reward on label rows whose `rewards` follow `names` (None: nothing to measure);
    it picks among the experts it knows that are in `names`."""
    usable = np.array([e in names for e in router.experts])
    if rows.height == 0 or not usable.any():
        return None
    probs = np.where(usable, router.probs(rows["text"].to_list()), -np.inf)
    picked = [names.index(router.experts[i]) for i in probs.argmax(axis=1)]
    rewards = np.array(rows["rewards"].to_list(), dtype=float)
    return float(np.nanmean(rewards[np.arange(rows.height), picked]))


def remeasure(store: Store, champion: Champion, challenger_fp: str, report: EvalReport,
              labels_ref: LabelsRef | None = None) -> tuple[float | None, float | None, int]:
    """(challenger reward, champion reward, queries) on the challenger's validation queries that the champion did
    not train on either (see the module docstring). `labels_ref`: the challenger's labels as the run holds them
    (else read from the store)."""
    from cluster.router import Router  # torch + transformers: only when a re-measurement is needed

    if labels_ref is not None and labels_ref.fingerprint == report.labels:
        labels, names = labels_ref.frame(store), labels_ref.experts
    else:
        labels, names = _labels(store, report.labels)
    seed = report.validation.seed if report.validation else 0
    _, val = train_val(labels, seed)
    old = None
    if not store.exists(labels_path(champion.labels)):  # its training queries are unknown: none is known unseen
        val = val.clear()
    elif not champion.val_unseen:  # its targets' tag prior averaged over its labels' whole training split
        seen = _labels(store, champion.labels)[0].filter(pl.col("split") == "train")
        val = val.join(seen.select("query_id"), on="query_id", how="anti")
    else:
        old = Router.from_store(store, champion.router_fp)
        fitted, _ = train_val(_labels(store, champion.labels)[0], old.config.seed)
        val = val.join(fitted.select("query_id"), on="query_id", how="anti")
    if val.height == 0:
        return None, None, 0
    old = old or Router.from_store(store, champion.router_fp)
    new = Router.from_store(store, challenger_fp)
    return reward_on(new, val, names), reward_on(old, val, names), val.height


def decide(challenger: float | None, champion: float | None, has_champion: bool) -> tuple[str, str]:
    """(decision, reason): "promoted" or "kept"; a tie promotes the challenger."""
    if not has_champion:
        return "promoted", "no champion yet"
    if champion is None:
        return "promoted", "the champion cannot be measured on this validation slice"
    if challenger is None:
        return "kept", "the challenger has no reward on this validation slice"
    if challenger >= champion:
        return "promoted", "the challenger is not worse than the champion on validation"
    return "kept", "the challenger is worse than the champion on validation"


def publish(store: Store, router_fp: str, eval_fp: str, report: EvalReport, run_id: str,
            leases: Leases | None = None, labels: LabelsRef | None = None) -> ChampionDecision:
    """Compare the run's router with the champion on validation, write the champion record if it wins; return the
    decision. Concurrent runs publish one after the other, under a lease on the champion record: the run's
    `leases`, or leases of this call's own (closed when it returns). `labels`: the run's labels ref, for a
    re-measurement on its validation slice without reading them back."""
    if leases is None:
        with Leases(store, owner=run_id) as own:
            return publish(store, router_fp, eval_fp, report, run_id, own, labels)
    with leases.hold(CHAMPION_PATH):
        return _publish(store, router_fp, eval_fp, report, run_id, labels)


def _publish(store: Store, router_fp: str, eval_fp: str, report: EvalReport, run_id: str,
             labels: LabelsRef | None = None) -> ChampionDecision:
    challenger, test = report.val_reward, report.router_reward
    val = report.validation
    queries = val.queries if val else None
    old = read_champion(store)
    common = dict(challenger=router_fp, challenger_test_reward=test, split="validation")
    if old is not None and old.router_fp == router_fp:
        return ChampionDecision(decision="kept", reason="the champion is this run's router",
                                challenger_reward=challenger, champion=old.router_fp,
                                champion_reward=old.val_reward, compared_on=old.labels, queries=queries, **common)
    champ = None
    if old is not None:
        if (old.labels == report.labels and old.val_reward is not None and val and old.val_seed == val.seed
                and old.val_unseen):
            champ = old.val_reward
        else:
            challenger, champ, queries = remeasure(store, old, router_fp, report, labels)
    decision, reason = decide(challenger, champ, old is not None)
    if decision == "promoted":
        new = Champion(router=router_dir(router_fp), evaluation=evaluation_dir(eval_fp), labels=report.labels,
                       experts=report.experts, reward=test, val_reward=report.val_reward,
                       val_seed=val.seed if val else None, val_unseen=True, run_id=run_id,
                       published=datetime.now(UTC).isoformat(), replaced=old.router_fp if old else None)
        store.write_json(CHAMPION_PATH, new.model_dump(mode="json"))
    return ChampionDecision(decision=decision, reason=reason, challenger_reward=challenger,
                            champion=old.router_fp if old else None, champion_reward=champ,
                            compared_on=report.labels if old else None, queries=queries if old else None, **common)
