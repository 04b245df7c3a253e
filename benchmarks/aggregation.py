"""Benchmark: the aggregate step at 10M score rows, Polars (the flow's code) against the same math in pandas.

Data: synthetic score cells laid out as the store lays them out (schemas/artifacts.py `score_path`, schema
SCORES): 625,000 queries in shards of 10,000, 8 experts, 2 reward models = 10,000,000 score rows in 1,008 cells,
plus the queries and tag cells. RM `judge` (weight 1): a normal score, 1 % null; RM `exact` (weight 0.5): 0/1,
80 % null (no reference answer), as the demo's verifiable reward. Each query has 0-3 of 64 tags.

Variants, each in its own process (peak RSS = that process's `ru_maxrss`; time = the computation only, imports
and data generation excluded), median of --repeats (one run where the first takes over a minute):
    polars_streaming  tasks/aggregate.py `label_plans`, the labels plan `run_aggregate` collects in the flow
                      (combine -> softmax -> tag enhance -> one row per query with lists), on Polars' streaming
                      engine (the flow's)
    polars_in_memory  the same on the in-memory engine
    pandas            the same computation written in pandas (read every cell, groupby/transform/explode/merge)
The outputs must agree to 1e-9 (asserted). Goals (on the flow's engine): pandas / polars time >= 5, Polars peak
RSS <= 2 GiB. `cpu_seconds` (all threads) is reported too: steadier than wall time when other work shares the cores.
Results: benchmarks/results/aggregation.json and summary.json.

    python benchmarks/aggregation.py                   # 625k queries x 8 experts x 2 RMs
    python benchmarks/aggregation.py --queries 20000   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.artifacts import QUERIES, SCORES, TAGS, queries_path, score_path, tags_path

EXPERTS = [(f"expert{i}", f"e{i:011d}") for i in range(8)]
RMS = [("judge", "j00000000000", 1.0), ("exact", "x00000000000", 0.5)]
TAGGER = "t00000000000"
SHARD = 10_000
GOAL_SPEEDUP, GOAL_RSS_GIB = 5.0, 2.0


def sources():
    from tasks.aggregate import ScoreSource

    return [ScoreSource(rm, fp, w) for rm, fp, w in RMS]


def write(root: Path, rel: str, table: pa.Table, schema: pa.Schema) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.cast(schema), p, compression="zstd")


def make_data(root: Path, n_queries: int, seed: int = 0) -> list[int]:
    """Queries, tags and score cells of `n_queries` in shards of SHARD; returns the shard indices."""
    rng = np.random.default_rng(seed)
    tags = np.array([f"tag{i:02d}" for i in range(64)])
    shards = list(range((n_queries + SHARD - 1) // SHARD))
    for s in shards:
        n = min(SHARD, n_queries - s * SHARD)
        ids = [f"q{s * SHARD + i:08d}" for i in range(n)]
        write(root, queries_path(s), pa.table({
            "query_id": ids, "text": [f"question {q}" for q in ids], "input_tags": [[]] * n,
            "reference": [None] * n, "split": [None] * n, "source_line": np.arange(n) + s * SHARD + 1}), QUERIES)
        k = rng.integers(0, 4, n)
        write(root, tags_path(TAGGER, s), pa.table({
            "query_id": ids, "tags": [list(rng.choice(tags, j, replace=False)) for j in k]}), TAGS)
        for rm, rm_fp, _ in RMS:
            for name, efp in EXPERTS:
                if rm == "judge":
                    score = rng.normal(-2.0, 1.0, n)
                    null = rng.random(n) < 0.01
                else:
                    score = (rng.random(n) < 0.4).astype(float)
                    null = rng.random(n) < 0.8
                write(root, score_path(rm, rm_fp, name, efp, s), pa.table({
                    "query_id": ids, "score": pa.array(score, mask=null), "flag": [None] * n}), SCORES)
    return shards


def run_polars(root: Path, shards: list[int], engine: str) -> pa.Table:
    from schemas.config import AggregateConfig
    from schemas.store import Store
    from tasks.aggregate import label_plans

    labels, _ = label_plans(Store(str(root)), EXPERTS, sources(), TAGGER, shards, AggregateConfig(), 0.25)
    return labels.collect(engine=engine).to_arrow()


def run_pandas(root: Path, shards: list[int]) -> pa.Table:
    """tasks/aggregate.py's math in pandas: same rules for nulls, same split, same tag means."""
    import pandas as pd

    from schemas.config import AggregateConfig
    from tasks.aggregate import hash_split

    agg, names = AggregateConfig(), [n for n, _ in EXPERTS]
    q = pd.concat([pd.read_parquet(root / queries_path(s), columns=["query_id", "text", "split"]) for s in shards],
                  ignore_index=True)
    q["split"] = q["split"].fillna(pd.Series(hash_split(q["query_id"].tolist(), 0.25), index=q.index))
    tg = pd.concat([pd.read_parquet(root / tags_path(TAGGER, s)) for s in shards], ignore_index=True)
    q = q.merge(tg, on="query_id", how="left")
    q["tags"] = q["tags"].map(lambda t: list(t) if t is not None and not isinstance(t, float) else [])
    parts = []
    for rm, rm_fp, w in RMS:
        for name, efp in EXPERTS:
            d = pd.concat([pd.read_parquet(root / score_path(rm, rm_fp, name, efp, s), columns=["query_id", "score"])
                           for s in shards], ignore_index=True)
            d["expert"], d["weight"] = name, w
            parts.append(d)
    sc = pd.concat(parts, ignore_index=True)
    del parts
    # combine: weighted sum of the non-null scores; no score at all -> the query's lowest reward; none -> dropped
    sc["ws"] = sc["weight"] * sc["score"]
    g = sc.groupby(["query_id", "expert"], sort=False)
    r = pd.DataFrame({"reward": g["ws"].sum(min_count=1)}).reset_index()
    del sc, g
    r["reward"] = r["reward"].fillna(r.groupby("query_id")["reward"].transform("min"))
    r = r.dropna(subset=["reward"])
    # softmax over experts per query, max-shifted
    e = np.exp((r["reward"] - r.groupby("query_id")["reward"].transform("max")) / agg.temperature)
    r["soft"] = e / e.groupby(r["query_id"]).transform("sum")
    # tag enhancement: tag means over train queries, then the mean over a query's tags
    per = r.merge(q[["query_id", "split", "tags"]], on="query_id")
    ex = per[["query_id", "expert", "split", "soft", "tags"]].explode("tags").dropna(subset=["tags"])
    tag_means = (ex[ex["split"] == "train"].groupby(["tags", "expert"], sort=False)["soft"].mean()
                 .rename("s_t").reset_index())
    s_tags = (ex[["query_id", "expert", "tags"]].merge(tag_means, on=["tags", "expert"])
              .groupby(["query_id", "expert"], sort=False)["s_t"].mean().rename("s_tags").reset_index())
    del ex
    per = per.merge(s_tags, on=["query_id", "expert"], how="left")
    per["target"] = np.where(per["s_tags"].isna(), per["soft"],
                             agg.beta * per["soft"] + (1 - agg.beta) * per["s_tags"])
    # one row per query with every expert, lists in expert order
    per["_i"] = per["expert"].map({n: i for i, n in enumerate(names)})
    per = per.sort_values(["query_id", "_i"])
    g = per.groupby("query_id", sort=False)
    wide = pd.DataFrame({"rewards": g["reward"].agg(list), "soft": g["soft"].agg(list),
                         "target": g["target"].agg(list), "_n": g.size()})
    wide = wide[wide["_n"] == len(names)].drop(columns="_n").reset_index()
    out = q.merge(wide, on="query_id").sort_values("query_id")
    return pa.Table.from_pandas(out[["query_id", "text", "split", "tags", "rewards", "soft", "target"]],
                                preserve_index=False)


def child(variant: str, root: Path, out: Path) -> None:
    """One variant in this process: writes its table to `out`, prints seconds and peak RSS."""
    shards = sorted(int(p.stem.removeprefix("shard-")) for p in (root / "queries").glob("shard-*.parquet"))
    t, c = time.perf_counter(), _cpu()
    table = run_pandas(root, shards) if variant == "pandas" else run_polars(
        root, shards, variant.removeprefix("polars_").replace("_", "-"))
    seconds, cpu = time.perf_counter() - t, _cpu() - c
    pq.write_table(table, out)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_bytes": rss, "rows": table.num_rows}))


def _cpu() -> float:
    """CPU seconds of this process (all threads): steadier than wall time when other work shares the cores."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def compare(a: Path, b: Path) -> float:
    """Largest absolute difference of the float lists; asserts the rest is equal."""
    import polars as pl

    x, y = pl.read_parquet(a), pl.read_parquet(b)
    assert x.height == y.height > 0, (x.height, y.height)
    for c in ("query_id", "text", "split"):
        assert x[c].equals(y[c]), c
    assert x["tags"].list.sort().equals(y["tags"].list.sort()), "tags"
    worst = 0.0
    for c in ("rewards", "soft", "target"):
        assert (x[c].list.len() == y[c].list.len()).all(), c
        d = (x[c].explode() - y[c].explode()).abs().max()
        worst = max(worst, float(d))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=625_000, help="Queries (x 8 experts x 2 RMs score rows).")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="polars_streaming,polars_in_memory,pandas")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]), Path(args.child[2]))
    variants = args.variants.split(",")
    rows = args.queries * len(EXPERTS) * len(RMS)
    res: dict = {"setup": {"queries": args.queries, "experts": len(EXPERTS), "reward_models": len(RMS),
                           "score_rows": rows, "shard_size": SHARD, "repeats_max": args.repeats,
                           "cpus": os.cpu_count(), "load_before": round(os.getloadavg()[0], 2)}}
    with tempfile.TemporaryDirectory(prefix="zooter-agg-") as tmp:
        root = Path(tmp) / "store"
        t = time.perf_counter()
        make_data(root, args.queries)
        res["setup"]["data_seconds"] = round(time.perf_counter() - t, 1)
        print(f"data: {rows:,} score rows in {res['setup']['data_seconds']}s", file=sys.stderr)
        outs = {}
        for v in variants:
            runs = []
            for i in range(args.repeats):
                outs[v] = Path(tmp) / f"{v}.parquet"
                p = subprocess.run([sys.executable, __file__, "--child", v, str(root), str(outs[v])],
                                   capture_output=True, text=True)
                if p.returncode:
                    raise RuntimeError(f"{v} failed:\n{p.stderr[-3000:]}")
                runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
                print(f"{v} #{i + 1}: {runs[-1]['seconds']:.2f}s, {runs[-1]['cpu_seconds']:.2f} CPU s, "
                      f"{runs[-1]['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
                if runs[0]["seconds"] > 60:  # repeats are for runs under a minute
                    break
            res[v] = {"seconds_median": round(statistics.median(r["seconds"] for r in runs), 3),
                      "seconds": [round(r["seconds"], 3) for r in runs],
                      "cpu_seconds_median": round(statistics.median(r["cpu_seconds"] for r in runs), 3),
                      "peak_rss_gib_max": round(max(r["peak_rss_bytes"] for r in runs) / 2**30, 3),
                      "rows": runs[0]["rows"]}
        base = variants[0]
        res["max_abs_diff"] = {v: compare(outs[base], outs[v]) for v in variants[1:]}
        assert all(d <= 1e-9 for d in res["max_abs_diff"].values()), res["max_abs_diff"]
    res["setup"]["load_after"] = round(os.getloadavg()[0], 2)
    best = "polars_streaming"  # the flow's engine (tasks/aggregate.py run_aggregate)
    if "pandas" in variants and best in variants:
        res["speedup_pandas_over_polars"] = round(res["pandas"]["seconds_median"] / res[best]["seconds_median"], 2)
        res["cpu_ratio_pandas_over_polars"] = round(res["pandas"]["cpu_seconds_median"]
                                                    / res[best]["cpu_seconds_median"], 2)
    out = Path(__file__).parent / "results" / "aggregation.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    if args.queries == 625_000 and {"pandas", best} <= set(variants):  # the goal's size only
        sys.path.insert(0, str(Path(__file__).parent))
        from summary import record

        sp, rss = res["speedup_pandas_over_polars"], res[best]["peak_rss_gib_max"]
        raw = {"setup": res["setup"], **{v: res[v] for v in variants}, "max_abs_diff": res["max_abs_diff"]}
        record("aggregation 10M rows: pandas / polars time", sp, f">= {GOAL_SPEEDUP:g}", "x", sp >= GOAL_SPEEDUP, raw)
        record("aggregation 10M rows: polars peak RSS", rss, f"<= {GOAL_RSS_GIB:g}", "GiB", rss <= GOAL_RSS_GIB,
               {"variant": best, **{v: res[v]["peak_rss_gib_max"] for v in variants}})


if __name__ == "__main__":
    main()
