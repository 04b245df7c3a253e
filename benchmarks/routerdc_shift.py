"""Does RouterDC's training split say anything below the task level that holds on its test split? Why the
cross-validation of benchmarks/routerdc_cv.py cannot find a route past ~59, and where the ceiling lies.

Nothing here trains a router anyone uses or chooses anything; three measurements:

1. Within-task clusters, no head. Each task's queries are clustered (k-means over the frozen encoder's unit-length
   embeddings, `tasks.tag.kmeans`, k in KS, centroids from the fit queries) and each cluster is routed to its best
   expert by the fit queries' mean credit; against routing the whole task to its best expert. Three protocols, the
   same rule: 5-fold CV inside the train files, 5-fold CV inside the test files, and fit on the train files ->
   scored on the test files (folds: `routerdc_cv.folds`, per task, seeds 0-2). If the train files' sub-task
   structure were the test files', the first and third would agree.
2. The same with the router: examples/routerdc.yaml with tags [task, that task's cluster] (k 4) in place of the
   task alone, so the tag prior averages the task's and the cluster's; CV on the train split paired with the
   config fold by fold, and the test average of the routers `zooter train` would train (3 seeds), as
   `routerdc_cv.py` measures its points.
3. The ceiling: the config's router cross-validated *inside the test files* (5 folds x 3 seeds: trained on four
   fifths of the test queries, scored on the fifth), against each task's best expert chosen on the same four
   fifths. This and the inside-test protocol of (1) fit on test queries on purpose: they measure how much
   per-query signal the test files themselves hold, with no shift between fit and score; a diagnostic only.
4. The validation slice's share in the tag prior. The labels' tag prior averages over every training query, the
   router's validation slice too (`tasks.aggregate`: labels do not depend on the router's seed), so a router
   trained on the labels' own targets has seen its validation queries' per-task mean rewards; train_router takes
   the prior from the rows it fits (`tasks.aggregate.refit_targets`). For examples/routerdc.yaml and
   routerdc-cluster.yaml, seeds 0-2: the routers `zooter train` trains, against the same on the labels' own
   targets (train_router before its CODE_VERSION 3); validation and test averages of both.

    python benchmarks/routerdc_shift.py   (after `make routerdc`; ~12 min on 2 cores)
    -> benchmarks/results/routerdc_shift.json and Markdown on stdout
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from schemas.config import AggregateConfig, RouterConfig
from tasks.aggregate import refit_targets
from tasks.tag import kmeans, nearest, unit_rows

sys.path.insert(0, str(Path(__file__).parent))
from routerdc_cv import CLUSTER, FOLDS, Labels, cv_seed, folds, labels, paired, report_seed  # noqa: E402
from routerdc_seeds import CONFIG, ROOT, ms, setup  # noqa: E402

KS = (2, 4, 8)
SEEDS = 3
OUT = ROOT / "benchmarks/results/routerdc_shift.json"


def task_clusters(x: np.ndarray, task: np.ndarray, fit: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Each row's cluster within its task (k-means over that task's `fit` rows; every row of the task assigned)."""
    out = np.zeros(len(x), dtype=np.int64)
    for t in np.unique(task):
        m = task == t
        out[m] = nearest(x[m], kmeans(x[m & fit], k, seed))
    return out


def routed_avg(r: np.ndarray, task: np.ndarray, fit: np.ndarray, ev: np.ndarray,
               cluster: np.ndarray | None = None) -> float:
    """Task average on `ev` (percent) of routing each task, or with `cluster` each cluster of it, to its best expert
    on `fit` (a cluster without fit rows: its task's)."""
    avg = []
    for t in np.unique(task):
        f, e = fit & (task == t), ev & (task == t)
        best = r[f].mean(0).argmax()
        if cluster is None:
            pick = np.full(e.sum(), best)
        else:
            per_cluster = {c: r[f & (cluster == c)].mean(0).argmax() for c in np.unique(cluster[f])}
            pick = np.array([per_cluster.get(c, best) for c in cluster[e]])
        avg.append(r[e][np.arange(e.sum()), pick].mean())
    return 100 * float(np.mean(avg))


def route_gain(r: np.ndarray, task: np.ndarray, cluster: np.ndarray, fit: np.ndarray, ev: np.ndarray) -> float:
    """Routing each cluster to its best expert on `fit` minus routing each task to its best expert on `fit`:
    the task averages on `ev`, in points."""
    return routed_avg(r, task, fit, ev, cluster) - routed_avg(r, task, fit, ev)


def no_head(data: Labels) -> list[dict]:
    """1.: for each k, the within-task clusters' routing gain under the three protocols (percent)."""
    rows = data[1]
    x = unit_rows(np.array(data[0]["vector"].to_list(), dtype=np.float32))
    r = np.array(rows["rewards"].to_list(), dtype=float)
    task = rows["tags"].list.first().to_numpy()
    train = (rows["split"] == "train").to_numpy()
    out = []
    for k in KS:
        res: dict = {"k": k}
        for name, pool in (("inside_train", train), ("inside_test", ~train)):
            gains = []
            for seed in range(SEEDS):
                fold = np.full(len(r), -1)
                keep = pl.Series(pool)
                fold[pool] = folds(rows["query_id"].filter(keep), rows["tags"].list.first().filter(keep),
                                   FOLDS, seed).to_numpy()
                for f in range(FOLDS):
                    fit, ev = pool & (fold != f), pool & (fold == f)
                    gains.append(route_gain(r, task, task_clusters(x, task, fit, k, seed), fit, ev))
            res[name] = ms(gains) | {"se": float(np.std(gains, ddof=1) / np.sqrt(len(gains)))}
        res["train_to_test"] = ms([route_gain(r, task, task_clusters(x, task, train, k, seed), train, ~train)
                                   for seed in range(SEEDS)])
        out.append(res)
        print(json.dumps(res), flush=True)
    return out


def with_task_clusters(data: Labels, k: int, agg: AggregateConfig) -> Labels:
    """`data` with each query tagged [task, task:cluster] (centroids from the train split), targets recomputed."""
    rows, by_task, experts = data
    x = unit_rows(np.array(rows["vector"].to_list(), dtype=np.float32))
    task = rows["tags"].list.first().to_numpy()
    c = task_clusters(x, task, (rows["split"] == "train").to_numpy(), k, 0)
    tags = pl.Series("tags", [[t, f"{t}:{j}"] for t, j in zip(task, c, strict=True)], dtype=pl.List(pl.String))
    rows = rows.with_columns(tags)
    return refit_targets(rows, rows["split"] == "train", agg), by_task, experts


def inside_test(data: Labels, agg: AggregateConfig) -> Labels:
    """The test rows relabelled as the training split (targets' tag prior from them), for the ceiling."""
    swap = lambda d: d.filter(pl.col("split") == "test").with_columns(pl.lit("train").alias("split"))  # noqa: E731
    rows, by_task, experts = data
    rows = swap(rows)
    return refit_targets(rows, rows["split"] == "train", agg), swap(by_task), experts


def prior_leak(name: str, data: Labels, router: RouterConfig, agg: AggregateConfig,
               as_trained: list[dict] | None = None) -> dict:
    """4.: validation and test averages of a config's routers (seeds 0..SEEDS-1) as `zooter train` trains them, the
    tag prior of their targets from their fit rows only (`as_trained`: their `report_seed`s where already fitted),
    and with the labels' own targets, whose prior holds the validation slice's rewards (train_router before its
    CODE_VERSION 3); the differences (fit-only minus the labels' prior)."""
    runs = {"labels_prior": [report_seed(data, router, agg, seed, prior="labels") for seed in range(SEEDS)],
            "fit_only_prior": as_trained or [report_seed(data, router, agg, seed) for seed in range(SEEDS)]}
    diff = {k: [b[k] - a[k] for a, b in zip(runs["labels_prior"], runs["fit_only_prior"], strict=True)]
            for k in ("val_avg", "test_avg")}
    out = {"config": name, **runs, "fit_only_minus_labels_prior": {k: ms(v) | {"per_seed": v} for k, v in diff.items()}}
    print(json.dumps({"config": name, **out["fit_only_minus_labels_prior"]}), flush=True)
    return out


def main() -> None:
    s = setup()
    agg, router = s.cfg.aggregate, s.cfg.router
    data = labels(s, agg)
    t0 = time.perf_counter()
    result: dict = {"config": "examples/routerdc.yaml", "folds": FOLDS, "seeds": SEEDS, "no_head": no_head(data)}

    # 2. the router with within-task cluster tags, paired with the config on the train split's CV
    k = 4
    base = [v for seed in range(SEEDS) for v in cv_seed(data, router, agg, seed, FOLDS)]
    clustered = with_task_clusters(data, k, agg)
    cv = [v for seed in range(SEEDS) for v in cv_seed(clustered, router, agg, seed, FOLDS)]
    reports = {name: [report_seed(d, router, agg, seed) for seed in range(SEEDS)]
               for name, d in (("config", data), ("task_clusters", clustered))}
    test = {name: [r["test_avg"] for r in runs] for name, runs in reports.items()}
    result["router_task_clusters"] = {"k": k, "cv_config": ms(base), "cv": ms(cv), "cv_vs_config": paired(cv, base),
                                      "test_config": ms(test["config"]), "test": ms(test["task_clusters"])}
    print(json.dumps(result["router_task_clusters"]), flush=True)

    # 3. the ceiling: the config's router cross-validated inside the test files, and the task's best expert
    rows, by_task, experts = inside = inside_test(data, agg)
    r = np.array(by_task["rewards"].to_list(), dtype=float)
    task = by_task["tags"].list.first()
    ceiling, task_best = [], []
    for seed in range(SEEDS):
        ceiling += cv_seed(inside, router, agg, seed, FOLDS)
        fold = folds(by_task["query_id"], task, FOLDS, seed).to_numpy()
        task_best += [routed_avg(r, task.to_numpy(), fold != f, fold == f) for f in range(FOLDS)]
    result["ceiling"] = {"router": ms(ceiling), "task_best": ms(task_best), "router_vs_task_best":
                         paired(ceiling, task_best), "router_folds": ceiling, "task_best_folds": task_best}
    print(json.dumps({k: v for k, v in result["ceiling"].items() if not k.endswith("folds")}), flush=True)
    c = setup(CLUSTER)
    result["prior_leak"] = [prior_leak(CONFIG.name, data, router, agg, reports["config"]),
                            prior_leak(CLUSTER.name, labels(c, c.cfg.aggregate), c.cfg.router, c.cfg.aggregate)]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    tmp = OUT.with_suffix(".tmp")  # atomic: a reader never sees half a file
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(OUT)

    print("| within-task clusters, each to its best expert, minus the task's best expert | k 2 | k 4 | k 8 |\n"
          "|---|---|---|---|")
    for proto, label in (("inside_train", "5-fold CV inside the train files"),
                         ("inside_test", "5-fold CV inside the test files"),
                         ("train_to_test", "fit on the train files, scored on the test files")):
        print(f"| {label} | " + " | ".join(f"{x[proto]['mean']:+.2f}" + (f" (se {x[proto]['se']:.2f})"
                                                                          if "se" in x[proto] else "")
                                              for x in result["no_head"]) + " |")


if __name__ == "__main__":
    main()
