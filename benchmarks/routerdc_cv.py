"""K-fold cross-validation over RouterDC's training split: how the sweep's points and a cluster tagger's k are
chosen, since one 15 % validation slice per seed (9-21 HumanEval queries) makes every choice noise.

For each seed, the training split's queries are dealt into K folds (hash-ranked within each task, so every fold
holds its share of every task); each fold is scored once by a head trained on the other K - 1 folds, which also
pick its epoch on it, as the validation slice does in `train_router`. A point's score is the mean over folds and
seeds of the validation average (mean over tasks of the routed expert's credit, `tasks.evaluate.validate`); every
training query is validated exactly once per seed. Points are compared with their reference (the same config
without the change) fold by fold: the paired difference's mean and spread. The test split only reports: the
chosen points are then trained as `zooter train` trains them (the whole training split less the seed's 15 %
validation slice, the labels' own targets; in this process, as below) and their test average printed beside.

Two things differ from `train_router`, on purpose:
- the tag prior s_t of the fold's training targets is recomputed from its training folds only
  (`tasks.aggregate.tag_enhance`): the labels' prior averages over every training query, the held-out fold too,
  which leaks that fold's rewards into the targets (the more so, the smaller the tags: cluster k);
- the head is fitted in this process (`cluster.train.fit` in Ray Train's local mode, `num_workers: 0`, one
  thread): no worker process or checkpoint file for each of a point's 15 fits; the same best epoch and weights as
  one Ray Train worker (tests/cluster/test_router.py).

    python benchmarks/routerdc_cv.py [--folds 5] [--seeds 3] [--only NAME ...] [--test NAME ...]
    -> benchmarks/results/routerdc_cv.json and a Markdown table on stdout (after `make routerdc`)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from tempfile import gettempdir

import numpy as np
import polars as pl
import torch

from cluster.train import _setup, fit
from schemas.artifacts import LABELS, labels_path
from schemas.config import AggregateConfig, RouterConfig
from tasks.aggregate import refit_targets, run_aggregate, train_val
from tasks.evaluate import validate
from tasks.route import choose
from tasks.train_router import bce_targets, with_features

sys.path.insert(0, str(Path(__file__).parent))
from routerdc_seeds import CONFIG, ROOT, Setup, ms, setup  # noqa: E402

FOLDS = 5
CLUSTER = ROOT / "examples/routerdc-cluster.yaml"
OUT = ROOT / "benchmarks/results/routerdc_cv.json"


def folds(ids: pl.Series, strata: pl.Series, k: int, seed: int) -> pl.Series:
    """Each query's fold (0..k-1): queries ranked by a hash of (seed, id) within their stratum, dealt in turn, so
    folds differ in size by at most one per stratum; stable across Polars versions (sha256, not Polars' hash)."""
    h = [int(hashlib.sha256(f"cv:{seed}:{q}".encode()).hexdigest()[:12], 16) for q in ids.to_list()]
    df = pl.DataFrame({"s": strata, "h": pl.Series(h, dtype=pl.UInt64)})
    return df.select((pl.col("h").rank("ordinal").over("s") - 1) % k)["h"].cast(pl.Int32).rename("fold")


def fit_probs(cfg: RouterConfig, fit_rows: pl.DataFrame, val: pl.DataFrame, experts: list[str],
              *others: pl.DataFrame) -> list[np.ndarray]:
    """Train a frozen-encoder head on `fit_rows` (vector, target), its epoch chosen on `val` (vector, target,
    rewards, tags) as train_router does; the best epoch's probabilities on `val` and on each of `others`."""
    best, _, _ = fit(cfg.model_copy(update={"num_workers": 0}), fit_rows.select("vector", "target").to_arrow(),
                     val.select("vector", "target", "rewards", "tags").to_arrow(), experts, "cv", gettempdir())
    head, _, _ = _setup(cfg, len(experts), fit_rows, val)
    head.load_state_dict(best["model"])
    with torch.no_grad():
        return [torch.softmax(head.eval().head_logits(torch.tensor(np.array(d["vector"].to_list(), dtype=np.float32))),
                              -1).numpy() for d in (val, *others)]


Labels = tuple[pl.DataFrame, pl.DataFrame, list[str]]  # what `labels` returns


def labels(s: Setup, agg: AggregateConfig) -> Labels:
    """(labels with the setup's tags and the embed step's `vector`, the same rows with task tags, the experts),
    sorted by query id: the router trains on the first, is measured per task on the second."""
    labels_fp = run_aggregate(s.store, s.experts, s.sources, s.tagger_fp, s.shards, agg,
                              s.cfg.test_fraction).fingerprint
    eval_fp = labels_fp if s.eval_tagger_fp == s.tagger_fp else run_aggregate(
        s.store, s.experts, s.sources, s.eval_tagger_fp, s.shards, agg, s.cfg.test_fraction).fingerprint
    read = lambda fp: pl.from_arrow(s.store.read_table(labels_path(fp), LABELS)).sort("query_id")  # noqa: E731
    rows, by_task = read(labels_fp), read(eval_fp)
    if not rows["query_id"].equals(by_task["query_id"]):  # same queries, same rewards: only the tags differ
        raise ValueError(f"labels {labels_fp} and {eval_fp} hold other queries")
    return with_features(s.store, rows, s.embed_fp), by_task, s.store.read_meta(labels_path(labels_fp))["experts"]


def targets(cfg: RouterConfig, agg: AggregateConfig, fit_rows: pl.DataFrame, *rows: pl.DataFrame) -> list:
    """bce: every frame's targets from its rewards, tag-enhanced with `fit_rows`' means (as train_router does)."""
    return [bce_targets(fit_rows, d, agg.beta) for d in (fit_rows, *rows)] if cfg.loss == "bce" else [fit_rows, *rows]


def fold_cfg(router: RouterConfig, seed: int) -> RouterConfig:
    # one thread: on 2 shared cores, 2 OpenMP threads fitted 3.5x slower (measured); not in a router's fingerprint
    return router.model_copy(update={"seed": seed, "cpus_per_worker": 1})


def seed_split(rows: pl.DataFrame, seed: int, agg: AggregateConfig | None) -> tuple[pl.DataFrame, list[pl.Series]]:
    """(rows, [fit, validation, test] masks) of the router `zooter train` trains with `seed`: its 15 % validation
    slice, and with `agg` the targets' tag prior taken from the fit rows (as `tasks.train_router.fit_targets`);
    `agg=None` keeps the labels' own targets."""
    fit_mask, val_mask = (rows["query_id"].is_in(d["query_id"].implode()) for d in train_val(rows, seed))
    if agg is not None:
        rows = refit_targets(rows, fit_mask, agg)
    return rows, [fit_mask, val_mask, rows["split"] == "test"]


def report_seed(data: Labels, router: RouterConfig, agg: AggregateConfig, seed: int,
                credits: list[np.ndarray] | None = None, prior: str = "fit") -> dict:
    """The router `zooter train` would train (its seed's 15 % validation slice; the targets' tag prior from the fit
    rows only, as `tasks.train_router.fit_targets`), fitted in this process, on `data` (`labels`); its validation
    and test averages (percent, per task). Report only: nothing is chosen on it. `credits` (if given) receives
    each test query's credit under the router's pick, by query id. `prior="labels"`: the labels' own targets, whose
    prior holds the validation slice's rewards too (train_router before its CODE_VERSION 3)."""
    rows, by_task, experts = data
    rows, (fit_mask, val_mask, test_mask) = seed_split(rows, seed, agg if prior == "fit" else None)
    fit_rows, val, test = targets(router, agg, *(rows.filter(m) for m in (fit_mask, val_mask, test_mask)))
    pv, pt = fit_probs(fold_cfg(router, seed), fit_rows, val, experts, test)
    fit_t, test_t = by_task.filter(fit_mask), by_task.filter(test_mask)
    if credits is not None:
        rewards = np.array(test_t["rewards"].to_list(), dtype=float)
        credits.append(rewards[np.arange(len(pt)), choose(pt, None, 0.0)])  # validate's pick: the plain argmax
    return {"seed": seed, "val_avg": 100 * validate(by_task.filter(val_mask), fit_t, pv, seed).tag_average,
            "test_avg": 100 * validate(test_t, fit_t, pt, seed).tag_average}


def paired_test_gap(a: list[np.ndarray], b: list[np.ndarray], tasks: pl.Series, boot: int = 2000) -> dict:
    """Point a minus point b on the test split (percent), paired query by query and averaged over seeds (`a`, `b`:
    one credit array per seed, the same queries in the same order), with the spread the test split's own sampling
    adds: a bootstrap that redraws each task's test queries (with replacement, the same draw for both points) and
    recomputes the difference of the task averages. The seeds' sd leaves that spread out."""
    d = np.mean(a, axis=0) - np.mean(b, axis=0)
    rng = np.random.default_rng(0)
    per_task, draws = [], []
    for t in tasks.unique().sort():
        dt = d[(tasks == t).to_numpy()]
        per_task.append(float(dt.mean()))
        draws.append(dt[rng.integers(0, len(dt), (boot, len(dt)))].mean(axis=1))
    dist = 100 * np.mean(draws, axis=0)
    seeds = [100 * float(np.mean([(x - y)[(tasks == t).to_numpy()].mean() for t in tasks.unique().sort()]))
             for x, y in zip(a, b, strict=True)]
    return {"gap": 100 * float(np.mean(per_task)), "per_seed": seeds, "boot_sd": float(dist.std(ddof=1)),
            "ci95": [float(np.percentile(dist, 2.5)), float(np.percentile(dist, 97.5))], "boot": boot}


def cv_seed(data: Labels, router: RouterConfig, agg: AggregateConfig, seed: int, k: int) -> list[float]:
    """The validation average (percent) of each of the k folds of `data`'s training split (`labels`), one seed."""
    rows, by_task, experts = data
    train = rows["split"] == "train"
    rows, by_task = rows.filter(train), by_task.filter(train)
    fold = folds(rows["query_id"], by_task["tags"].list.first(), k, seed)
    out = []
    for f in range(k):
        held = fold == f
        fit_rows, val = targets(router, agg, *(refit_targets(rows, ~held, agg).filter(m) for m in (~held, held)))
        probs, = fit_probs(fold_cfg(router, seed), fit_rows, val, experts)
        out.append(100 * validate(by_task.filter(held), by_task.filter(~held), probs, seed).tag_average)
    return out


# name -> (config, tagger changes, router changes, aggregate changes, reference point for the paired difference)
Point = tuple[Path, dict, dict, dict, str]
BASE, CBASE = "task tags: config (examples/routerdc.yaml)", "cluster k 16: config (examples/routerdc-cluster.yaml)"
POINTS: dict[str, Point] = {
    BASE: (CONFIG, {}, {}, {}, BASE),
    # the ablation behind the defaults: what the sharp tag prior, beta and the head each buy
    "task tags: β 0 (tag prior only)": (CONFIG, {}, {}, {"beta": 0.0}, BASE),
    "task tags: β 1 (no tag prior)": (CONFIG, {}, {}, {"beta": 1.0}, BASE),
    "task tags: the paper's prior (mean of s(q))": (CONFIG, {}, {}, {"tag_temperature": None}, BASE),
    "task tags: linear head": (CONFIG, {}, {"head_hidden": 0}, {}, BASE),
    "task tags: hard loss": (CONFIG, {}, {"loss": "hard"}, {}, BASE),
    "task tags: kl_reverse": (CONFIG, {}, {"loss": "kl_reverse"}, {}, BASE),
    "task tags: tag temperature 0.1": (CONFIG, {}, {}, {"tag_temperature": 0.1}, BASE),
    "task tags: 5 heads": (CONFIG, {}, {"heads": 5}, {}, BASE),
    "task tags: label temperature 0.5": (CONFIG, {}, {}, {"temperature": 0.5}, BASE),
    "task tags: bce + 5 heads": (CONFIG, {}, {"loss": "bce", "heads": 5}, {}, BASE),
    "task tags: label temperature 2": (CONFIG, {}, {}, {"temperature": 2.0}, BASE),
    CBASE: (CLUSTER, {}, {}, {}, BASE),  # paired against the task tags: the tagger's gap on CV
    "cluster k 8": (CLUSTER, {"k": 8}, {}, {}, CBASE),
    "cluster k 32": (CLUSTER, {"k": 32}, {}, {}, CBASE),
    "cluster k 48": (CLUSTER, {"k": 48}, {}, {}, CBASE),
    "cluster k 16: tag temperature 0.1": (CLUSTER, {}, {}, {"tag_temperature": 0.1}, CBASE),
    "cluster k 16: 5 heads": (CLUSTER, {}, {"heads": 5}, {}, CBASE),
}


def paired(scores: list[float], ref: list[float]) -> dict[str, float]:
    """The point minus its reference, fold by fold (same seeds, same folds): mean, sd (ddof 1) and the mean's
    standard error."""
    d = np.array(scores) - np.array(ref)
    sd = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
    return {"mean": float(d.mean()), "sd": sd, "se": sd / np.sqrt(len(d))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--folds", type=int, default=FOLDS, help="K: folds of the training split per seed")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1: each draws its folds and its heads' init")
    ap.add_argument("--only", nargs="*", help="run only the points whose name contains one of these")
    ap.add_argument("--test", nargs="*", default=[], help="points (name substrings) whose test average to report")
    ap.add_argument("--gap", nargs=2, metavar=("A", "B"), help="two points (exact names): A minus B on the test "
                    "split, paired per query, with a bootstrap over the test queries (test_gaps in the results)")
    args = ap.parse_args()
    if args.gap and (unknown := [n for n in args.gap if n not in POINTS]):  # before any work
        ap.error(f"--gap: no point named {unknown} (names: {list(POINTS)})")
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    same = old.get("folds") == args.folds and old.get("seeds") == args.seeds
    done: dict[str, dict] = {p["name"]: p for p in old.get("points", [])} if same else {}  # earlier runs are kept
    gaps: dict[str, dict] = {g["name"]: g for g in old.get("test_gaps", [])} if same else {}
    setups: dict[tuple[str, str], Setup] = {}
    mine: set[str] = set()  # the points this run computes: for the others, the file (other runs) wins

    def setup_for(name: str) -> Setup:
        config, tagger = POINTS[name][:2]
        key = (str(config), json.dumps(tagger))
        if key not in setups:
            setups[key] = setup(config, tagger or None)
        return setups[key]

    def save() -> None:
        if OUT.exists() and (now := json.loads(OUT.read_text())).get("folds") == args.folds and \
                now.get("seeds") == args.seeds:  # points another run wrote meanwhile are kept
            done.update({p["name"]: p for p in now["points"] if p["name"] not in mine})
            gaps.update({g["name"]: g for g in now.get("test_gaps", []) if g["name"] not in mine})
        points = [done[n] for n in POINTS if n in done]  # config order
        for p in points:
            ref = done.get(POINTS[p["name"]][4])
            p["vs_reference"] = paired(p["cv"], ref["cv"]) if ref and p["name"] != ref["name"] else None
        tmp = OUT.with_suffix(".tmp")
        tmp.write_text(json.dumps({"folds": args.folds, "seeds": args.seeds, "points": points,
                                   "test_gaps": list(gaps.values())}, indent=2) + "\n")
        tmp.replace(OUT)

    for name, (_, tagger, r, a, ref) in POINTS.items():
        if name in done or (args.only and not any(o in name for o in args.only)):
            continue
        s, t = setup_for(name), time.perf_counter()
        mine.add(name)
        router, agg = s.cfg.router.model_copy(update=r), s.cfg.aggregate.model_copy(update=a)
        data = labels(s, agg)  # read once: every seed and fold reuses them
        per_seed = [cv_seed(data, router, agg, seed, args.folds) for seed in range(args.seeds)]
        cv = [v for fs in per_seed for v in fs]
        done[name] = {"name": name, "tagger": tagger, "router": r, "aggregate": a, "reference": ref,
                      "cv_avg": ms(cv), "cv_per_seed": [float(np.mean(fs)) for fs in per_seed], "cv": cv,
                      "seconds": round(time.perf_counter() - t, 1)}
        save()
        print(json.dumps({k: done[name][k] for k in ("name", "cv_avg", "seconds")}), flush=True)
    # per point: its seeds' test-query credits and the test rows (task, id), from the test report's fits
    credits: dict[str, tuple[list[np.ndarray], pl.DataFrame]] = {}

    def test_runs(name: str) -> list[dict]:
        """The point's routers as `zooter train` trains them, one per seed; their reports (credits kept)."""
        s, _, _, r, a, _ = setup_for(name), *POINTS[name]
        router, agg = s.cfg.router.model_copy(update=r), s.cfg.aggregate.model_copy(update=a)
        data = labels(s, agg)
        credits[name] = [], data[1].filter(data[1]["split"] == "test")
        return [report_seed(data, router, agg, seed, credits[name][0]) for seed in range(args.seeds)]

    for name in POINTS:
        # test reports made before train_router took the tag prior from the fit rows only (no "prior") are redone
        if name in done and any(o in name for o in args.test) and done[name].get("test_prior") != "fit":
            mine.add(name)
            runs = test_runs(name)
            done[name] |= {"test_avg": ms([x["test_avg"] for x in runs]), "test_runs": runs, "test_prior": "fit"}
            save()
            print(json.dumps({k: done[name][k] for k in ("name", "test_avg")}), flush=True)
    gap_name = f"{args.gap[0]} minus {args.gap[1]}" if args.gap else None
    if args.gap and gaps.get(gap_name, {}).get("prior") != "fit":  # as the test reports: computed when missing
        for name in args.gap:
            if name not in credits:  # not fitted by the test reports above
                test_runs(name)
        (a, test_a), (b, test_b) = (credits[n] for n in args.gap)
        if not test_a["query_id"].equals(test_b["query_id"]):
            raise SystemExit(f"--gap: {args.gap} route different test queries")
        mine.add(gap_name)
        gaps[gap_name] = {"name": gap_name, "prior": "fit", **paired_test_gap(a, b, test_a["tags"].list.first())}
        print(json.dumps(gaps[gap_name]), flush=True)
    save()
    points = json.loads(OUT.read_text())["points"]
    f = lambda m: f"{m['mean']:+.2f} ± {m['sd']:.2f} (se {m['se']:.2f})" if m else "reference"  # noqa: E731
    print(f"| point | CV avg ({args.folds} folds x {args.seeds} seeds) | vs reference, paired | test avg |\n"
          "|---|---|---|---|")
    for p in points:
        c, test = p["cv_avg"], p.get("test_avg")
        print(f"| {p['name']} | {c['mean']:.2f} ± {c['sd']:.2f} | {f(p['vs_reference'])} | "
              + (f"{test['mean']:.2f} ± {test['sd']:.2f} |" if test else "|"))
    for g in json.loads(OUT.read_text()).get("test_gaps", []):
        print(f"\n{g['name']} on test: {g['gap']:+.2f} (bootstrap over the test queries: sd {g['boot_sd']:.2f}, "
              f"95 % interval [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}]; per seed "
              + ", ".join(f"{x:+.2f}" for x in g["per_seed"]) + ")")


if __name__ == "__main__":
    main()
