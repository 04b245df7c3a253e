"""Leave one task out on RouterDC: train the router on four tasks, route the fifth task's test split.

A router meets queries from tasks it never saw. For each task T of the five, the router is trained (same config
as examples/routerdc.yaml, same step functions) on the labels of the other four tasks only, and routes T's test
queries. Those four-task labels are the full labels (tasks/aggregate.py `run_aggregate`) without T's rows: that is
exactly what aggregating a four-task import gives, since s(q) is per query and every tag prior s_t is computed
from the training queries carrying t only (with the `column` tagger a query's tag is its task). They are written
as their own labels artifact (fingerprint of the full labels' and T), so `run_train_router` trains on them as on
any labels, on the embed step's cached cells. Nothing of T (text, label, reward) reaches training or any choice.

Compared on T's test split (mean credit = accuracy, in %):
- router: argmax of the four-task router.
- router + fallback: `tasks.route.choose` with `Fallback(threshold, best single)`; the threshold is chosen on ID
  validation only: the top probability below which FALLBACK_SHARE of the four tasks' validation queries (the
  router's own held-out slice of their train split) lie (`tasks.calibrate.fallback_threshold`).
- best single: the expert with the best mean over the four tasks of its train-split accuracy (as `evaluate`).
- specialists: the best expert of each of the four tasks (by train-split accuracy); `specialist_nearest` routes
  all of T to the specialist of the training task whose mean query embedding (train split) is nearest (cosine) to
  the mean embedding of T's test queries (texts only, no label): a fixed choice learned from the four;
  `specialist_best` is the best of the four specialists on T's test split, chosen with hindsight: the best any
  "treat T like one of the known tasks" choice could do; `specialist_mean` their mean.
- T's best expert: the best fixed expert on T's test split (hindsight; the per-task perfect routing for T).
- oracle: the best expert per query.
The ID columns show what the fallback costs on familiar queries: the four tasks' validation slice and test split.

    python benchmarks/routerdc_loto.py   (after `make routerdc`: the tables imported and embedded)
    python benchmarks/routerdc_loto.py --available   (a preview while the embed step is still running: queries
        without an embedding yet are left out of training and testing; the JSON says so and counts them)
    -> benchmarks/results/routerdc_loto.json and a Markdown table on stdout
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from cluster.pool import connect
from cluster.router import Router
from schemas.artifacts import LABELS, embeddings_dir, fingerprint, labels_path
from schemas.config import RayConfig, TrainConfig, load_config
from schemas.store import Store
from tasks.aggregate import ScoreSource, run_aggregate, train_val
from tasks.calibrate import fallback_threshold
from tasks.diagnostics import compute
from tasks.embed import embed_fingerprint, run_embed
from tasks.evaluate import per_tag_means
from tasks.import_scores import read_import
from tasks.route import Fallback, choose
from tasks.tag import make_tagger, run_tag
from tasks.train_router import run_train_router, with_features

ROOT = Path(__file__).resolve().parent.parent
FALLBACK_SHARE = 0.10  # fixed before looking at any held-out task: 10 % of familiar queries may fall back
SENSITIVITY = (0.05, 0.20, 0.30)  # reported beside it, never used to choose
CODE_VERSION = 1
AVAILABLE = "--available" in sys.argv


def four_task_labels(store: Store, labels: pl.DataFrame, meta: dict, labels_fp: str, task: str,
                     embed_fp: str) -> str:
    """Write (once) the labels without `task`'s queries as their own artifact; returns its fingerprint."""
    key = {"labels": labels_fp, "leave_out": task, "code": CODE_VERSION}
    rows = labels.filter(~pl.col("tags").list.contains(task))
    if AVAILABLE:  # a preview: only the queries embedded so far
        rows = features(store, rows, embed_fp).drop("vector")
        key["only"] = sorted(store.ls(embeddings_dir(embed_fp)))
    fp = fingerprint(key)
    if not store.valid_cell(labels_path(fp), LABELS, fp):
        store.write_table(labels_path(fp), rows.to_arrow(), LABELS,
                          meta | {"fingerprint": fp, "rows": rows.height, "left_out": task, "from_labels": labels_fp})
    return fp


def features(store: Store, rows: pl.DataFrame, embed_fp: str) -> pl.DataFrame:
    """`rows` with their embeddings; with --available, rows without one are dropped instead of an error."""
    if not AVAILABLE:
        return with_features(store, rows, embed_fp)
    cells = [f"{embeddings_dir(embed_fp)}/{n}" for n in store.ls(embeddings_dir(embed_fp)) if n.endswith(".parquet")]
    return rows.join(store.scan(cells).collect(), on="query_id", how="inner", maintain_order="left")


def vectors(rows: pl.DataFrame) -> np.ndarray:
    return np.array(rows["vector"].to_list(), dtype=np.float32)


def rewards_of(rows: pl.DataFrame, n_e: int) -> np.ndarray:
    return np.array(rows["rewards"].to_list(), dtype=float).reshape(rows.height, n_e)


def nearest_similarity(x: np.ndarray, ref: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Per row of `x`: cosine similarity to its nearest row of `ref`."""
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    x, ref = unit(x), unit(ref)
    return np.concatenate([(x[i:i + chunk] @ ref.T).max(axis=1) for i in range(0, len(x), chunk)])


def soft_of(rows: pl.DataFrame, n_e: int) -> np.ndarray:
    return np.array(rows["soft"].to_list(), dtype=float).reshape(rows.height, n_e)


def acc(r: np.ndarray, pick: np.ndarray | int) -> float:
    """Mean credit of the picks in %."""
    pick = np.full(len(r), pick) if np.isscalar(pick) else pick
    return 100 * float(r[np.arange(len(r)), pick].mean())


def tag_avg(rows: pl.DataFrame, r: np.ndarray, pick: np.ndarray) -> float:
    """Mean over tasks of the per-task accuracy in % (the RouterDC average)."""
    return 100 * per_tag_means(rows, r, {"x": pick}).strategies["x"]["tag_average"]


def held_out(store: Store, cfg: TrainConfig, labels: pl.DataFrame, meta: dict, labels_fp: str, embed_fp: str,
             task: str, experts: list[str]) -> dict:
    n_e = len(experts)
    fp = four_task_labels(store, labels, meta, labels_fp, task, embed_fp)
    t0 = time.perf_counter()
    trained = run_train_router(store, fp, cfg.router, embed_fp)
    router_fp, rmeta = trained.fingerprint, trained.meta
    seconds = round(time.perf_counter() - t0, 1)
    router = Router.from_store(store, router_fp)
    four = pl.from_arrow(store.read_table(labels_path(fp), LABELS))
    _, val = train_val(four, cfg.router.seed)  # the router's own validation slice
    train4 = with_features(store, four.filter(pl.col("split") == "train"), embed_fp)
    val, test4 = with_features(store, val, embed_fp), features(store, four.filter(pl.col("split") == "test"),
                                                               embed_fp)
    test = features(store, labels.filter(pl.col("tags").list.contains(task) & (pl.col("split") == "test")),
                    embed_fp)
    r_train, r_val, r_test4, r = (rewards_of(x, n_e) for x in (train4, val, test4, test))

    # Fixed choices learned from the four tasks' train splits.
    singles = per_tag_means(train4, r_train, {e: np.full(train4.height, i) for i, e in enumerate(experts)})
    tasks4 = [t for t in singles.tags]
    best = int(np.argmax([singles.strategies[e]["tag_average"] for e in experts]))
    spec = {t: int(np.argmax([singles.strategies[e][t] for e in experts])) for t in tasks4}
    unit = lambda m: m / np.linalg.norm(m)  # noqa: E731
    centroids = {t: unit(vectors(train4.filter(pl.col("tags").list.contains(t))).mean(axis=0)) for t in tasks4}
    nearest = max(tasks4, key=lambda t: float(centroids[t] @ unit(vectors(test).mean(axis=0))))

    p_val, p_test4, p = (router.probs_from_features(vectors(x)) for x in (val, test4, test))

    def with_fallback(share: float) -> dict:
        fb = Fallback(fallback_threshold(p_val, share), best)
        return {"share": share, "threshold": round(fb.below, 4),
                "held_out": acc(r, choose(p, None, 0.0, fb)),
                "held_out_fallback_rate": float((p.max(axis=1) < fb.below).mean()),
                "id_val_avg": tag_avg(val, r_val, choose(p_val, None, 0.0, fb)),
                "id_test_avg": tag_avg(test4, r_test4, choose(p_test4, None, 0.0, fb))}

    fallbacks = [with_fallback(s) for s in (FALLBACK_SHARE, *SENSITIVITY)]
    # The other signal of unfamiliarity: cosine similarity to the nearest training query (the router's own train
    # rows, so a validation query is never its own neighbour); the same 10 % of validation queries fall back.
    ref = train_val(four, cfg.router.seed)[0].select("query_id").join(train4, on="query_id")
    sim_val, sim_test, sim_test4 = (nearest_similarity(vectors(x), vectors(ref)) for x in (val, test, test4))
    cut = float(np.quantile(sim_val, FALLBACK_SHARE))
    far = lambda sim, probs: np.where(sim < cut, best, probs.argmax(axis=1))  # noqa: E731
    distance = {"share": FALLBACK_SHARE, "similarity_below": round(cut, 4), "held_out": acc(r, far(sim_test, p)),
                "held_out_fallback_rate": float((sim_test < cut).mean()),
                "id_val_avg": tag_avg(val, r_val, far(sim_val, p_val)),
                "id_test_avg": tag_avg(test4, r_test4, far(sim_test4, p_test4))}
    spec_acc = {t: acc(r, i) for t, i in spec.items()}
    return {
        "held_out": task, "queries": test.height,
        "test_queries_of_task": labels.filter(pl.col("tags").list.contains(task) & (pl.col("split") == "test")).height,
        "router": router_fp, "train_rows": rmeta["train_rows"],
        "val_rows": rmeta["val_rows"], "train_seconds": seconds,
        "router_acc": acc(r, p.argmax(axis=1)), "router_fallback": fallbacks[0],
        "best_single": {"expert": experts[best], "acc": acc(r, best)},
        "specialists": {t: {"expert": experts[i], "acc": spec_acc[t]} for t, i in spec.items()},
        "specialist_nearest": {"task": nearest, "expert": experts[spec[nearest]], "acc": spec_acc[nearest]},
        "specialist_best": max(spec_acc.values()), "specialist_mean": float(np.mean(list(spec_acc.values()))),
        "task_best_hindsight": {"expert": experts[int(r.mean(axis=0).argmax())], "acc": 100 * float(r.mean(0).max())},
        "oracle": 100 * float(r.max(axis=1).mean()),
        "router_share": dict(zip(experts, np.round(np.bincount(p.argmax(1), minlength=n_e) / len(p), 3).tolist(),
                                 strict=True)),
        "mean_confidence": {"held_out": float(p.max(1).mean()), "id_val": float(p_val.max(1).mean())},
        "id_val_avg": tag_avg(val, r_val, p_val.argmax(axis=1)),
        "id_test_avg": tag_avg(test4, r_test4, p_test4.argmax(axis=1)),
        "fallback_sensitivity": fallbacks[1:], "distance_fallback": distance,
        # the router's calibration and Figure 3 on familiar (the four tasks' test split) and unfamiliar queries
        "diagnostics": {"id_test": compute(soft_of(test4, n_e), r_test4, p_test4, best).model_dump(mode="json"),
                        "held_out": compute(soft_of(test, n_e), r, p, best).model_dump(mode="json")},
    }


def table(rows: list[dict]) -> str:
    """One row per held-out task and the mean over tasks (accuracy in %; fallback rates on the held-out task)."""
    cols = ["held-out task", "n", "router", "+ confidence fallback (rate)", "+ distance fallback (rate)",
            "best single of 4", "nearest-task specialist", "best specialist (hindsight)", "task's best (hindsight)",
            "oracle", "ID val: router / + conf. / + dist."]

    def cells(x: dict) -> list[float]:
        return [x["router_acc"], x["router_fallback"]["held_out"], x["distance_fallback"]["held_out"],
                x["best_single"]["acc"], x["specialist_nearest"]["acc"], x["specialist_best"],
                x["task_best_hindsight"]["acc"], x["oracle"], x["id_val_avg"], x["router_fallback"]["id_val_avg"],
                x["distance_fallback"]["id_val_avg"]]

    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for x in rows:
        c = cells(x)
        lines.append(f"| {x['held_out']} | {x['queries']} | {c[0]:.2f} | {c[1]:.2f} "
                     f"({x['router_fallback']['held_out_fallback_rate']:.0%}) | {c[2]:.2f} "
                     f"({x['distance_fallback']['held_out_fallback_rate']:.0%}) | {c[3]:.2f} "
                     f"({x['best_single']['expert'].split('/')[-1]}) | {c[4]:.2f} "
                     f"(as {x['specialist_nearest']['task']}) | {c[5]:.2f} | {c[6]:.2f} | {c[7]:.2f} | "
                     f"{c[8]:.2f} / {c[9]:.2f} / {c[10]:.2f} |")
    m = np.mean([cells(x) for x in rows], axis=0)
    lines.append(f"| **mean** | | {m[0]:.2f} | {m[1]:.2f} | {m[2]:.2f} | {m[3]:.2f} | {m[4]:.2f} | {m[5]:.2f} | "
                 f"{m[6]:.2f} | {m[7]:.2f} | {m[8]:.2f} / {m[9]:.2f} / {m[10]:.2f} |")
    lines += ["", "Calibration (confidence = top probability; accuracy = share of picks with the best credit "
              "available): ID = the four tasks' test split, OOD = the held-out task's.", "",
              "| held-out task | ID ECE | ID confidence | ID accuracy | OOD ECE | OOD confidence | OOD accuracy |",
              "|---" * 7 + "|"]
    for x in rows:
        i, o = x["diagnostics"]["id_test"], x["diagnostics"]["held_out"]
        lines.append(f"| {x['held_out']} | {i['ece']:.3f} | {i['confidence']:.3f} | {i['accuracy']:.3f} | "
                     f"{o['ece']:.3f} | {o['confidence']:.3f} | {o['accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    cfg: TrainConfig = load_config(ROOT / "examples/routerdc.yaml", model=TrainConfig)
    store = Store(cfg.store.url)
    rec = read_import(store, cfg.source)
    connect(RayConfig())  # the embed step (cached cells: a check) and Ray Train
    tagger = make_tagger(cfg.tagger, cfg)
    run_tag(store, tagger, rec.shards)
    embed_fp = embed_fingerprint(cfg.router) if AVAILABLE else run_embed(store, cfg.router, rec.shards).fingerprint
    labels_fp = run_aggregate(store, rec.experts, [ScoreSource(rec.name, rec.rm_fingerprint, 1.0)],
                              tagger.fingerprint, rec.shards, cfg.aggregate, cfg.test_fraction).fingerprint
    labels = pl.from_arrow(store.read_table(labels_path(labels_fp), LABELS))
    meta = store.read_meta(labels_path(labels_fp))
    tasks = sorted(labels.select(pl.col("tags").list.explode()).unique().to_series().drop_nulls().to_list())
    rows = []
    for task in tasks:
        rows.append(held_out(store, cfg, labels, meta, labels_fp, embed_fp, task, meta["experts"]))
        print(json.dumps({k: rows[-1][k] for k in ("held_out", "router_acc", "router_fallback", "best_single",
                                                   "train_seconds")}), flush=True)
    out = ROOT / f"benchmarks/results/routerdc_loto{'_preview' if AVAILABLE else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    definitions = {
        "router": "argmax of the router trained on the other four tasks' train split (examples/routerdc.yaml)",
        "router_fallback": f"tasks.route.choose with Fallback(threshold, best single of 4): threshold = top "
                           f"probability below which {FALLBACK_SHARE:.0%} of the four tasks' validation queries lie "
                           "(tasks.calibrate.fallback_threshold); chosen on ID validation only",
        "best_single": "expert with the best mean over the four training tasks of its train-split accuracy",
        "specialists": "each training task's best expert by train-split accuracy, and its accuracy on the "
                       "held-out test split",
        "specialist_nearest": "the specialist of the training task whose mean train-query embedding is nearest "
                              "(cosine) to the held-out test queries' mean embedding (no held-out labels used)",
        "specialist_best": "max over the four specialists of their held-out test accuracy (hindsight)",
        "task_best_hindsight": "the best fixed expert on the held-out test split (hindsight)",
        "oracle": "best expert per held-out test query",
        "id_val_avg / id_test_avg": "tag average over the four training tasks of the router's accuracy on their "
                                    "validation slice / test split",
        "fallback_sensitivity": "the same fallback at other validation shares; reported, never used to choose",
        "distance_fallback": "fall back to the best single of 4 when the query's cosine similarity to its nearest "
                             "training query is below the value under which the same share of validation queries "
                             "lie (an alternative signal; needs the training embeddings at routing time)",
    }
    out.write_text(json.dumps({"config": "examples/routerdc.yaml", "labels": labels_fp, "embeddings": embed_fp,
                               "queries": "only those embedded so far (--available)" if AVAILABLE else "all",
                               "fallback_share": FALLBACK_SHARE, "definitions": definitions, "held_out": rows},
                              indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
