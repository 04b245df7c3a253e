"""aggregate: rewards -> soft labels s(q) -> tag-enhanced targets s*(q), all in Polars over the cells.

    r_i(q)  = sum_k w_k * score_k(q, answer_i)        (null scores are skipped; see `combine`)
    s(q)    = softmax_i(r_i(q) / T)
    s_t     = mean of s(q) over *training* queries carrying tag t
              (or, with aggregate.tag_temperature = T_t: softmax_i(mean r_i over those queries / T_t))
    s*(q)   = beta * s(q) + (1 - beta) * mean_{t in T(q)} s_t     (s*(q) = s(q) when q has no known tag)
"""

from __future__ import annotations

import hashlib

import polars as pl

from schemas.artifacts import (
    HELD_OUT_SCORES,
    LABELS,
    ROW_FAILED,
    fingerprint,
    held_out_scores_path,
    labels_path,
    queries_path,
    score_path,
    tags_path,
)
from schemas.config import SCORE_LIMIT, AggregateConfig
from schemas.errors import ArtifactError
from schemas.plan import Expert, LabelsRef, ScoreSource
from schemas.store import Store

CODE_VERSION = 1


def hash_split(query_ids: list[str], test_fraction: float, salt: str = "split") -> list[str]:
    """Stable train/test assignment from the id alone (Polars' hash is not stable across versions).
    Different salts give independent splits (the router's validation slice uses its own)."""
    def one(q: str) -> str:
        u = int(hashlib.sha256(f"{salt}:{q}".encode()).hexdigest()[:8], 16) / 2**32
        return "test" if u < test_fraction else "train"
    return [one(q) for q in query_ids]


# The router holds out this share of its training queries (by a hash of the id) to pick its best epoch.
VAL_FRACTION = 0.15


def val_salt(seed: int = 0) -> str:
    """The validation slice's hash salt: the router's seed draws its slice (seed 0 keeps the original "val")."""
    return "val" if seed == 0 else f"val:{seed}"


def train_val(labels: pl.DataFrame, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(train, validation) rows of the labels' train split: the router trains on the first and picks its best
    epoch on the second; evaluate and publish measure it on the second. `seed` (router.seed) draws the slice, so
    seeds differ in the held-out queries too. Pure Polars, so preflight can check the sizes before anything runs."""
    train = labels.filter(pl.col("split") == "train")
    is_val = pl.Series(hash_split(train["query_id"].to_list(), VAL_FRACTION, salt=val_salt(seed)),
                       dtype=pl.String) == "test"
    if train.height < 8:  # too few rows to hold any out
        is_val = pl.Series([False] * train.height, dtype=pl.Boolean)
    return train.filter(~is_val), train.filter(is_val)


def combine(scores: pl.LazyFrame) -> pl.LazyFrame:
    """(query_id, expert, weight, score) -> (query_id, expert, reward).

    Rule for missing scores: a null score is left out of the weighted sum; an expert with no score at all for a
    query gets that query's lowest reward (it is never preferred), and a query no expert has a score for is dropped.
    """
    r = (scores.group_by("query_id", "expert")
         .agg(pl.when(pl.col("score").is_not_null().any())
              .then((pl.col("weight") * pl.col("score")).sum()).otherwise(None).alias("reward")))
    return (r.with_columns(pl.col("reward").fill_null(pl.col("reward").min().over("query_id")))
            .filter(pl.col("reward").is_not_null()))


def softmax(rewards: pl.LazyFrame, temperature: float) -> pl.LazyFrame:
    """Add s = softmax over experts of reward / T, per query (max-shifted for stability)."""
    z = (pl.col("reward") - pl.col("reward").max().over("query_id")) / temperature
    return (rewards.with_columns(z.exp().alias("_e"))
            .with_columns((pl.col("_e") / pl.col("_e").sum().over("query_id")).alias("soft")).drop("_e"))


def tag_enhance(soft: pl.LazyFrame, queries: pl.LazyFrame, beta: float,
                tag_temperature: float | None = None) -> pl.LazyFrame:
    """Add target = beta * s + (1 - beta) * mean of the train tag means of the query's tags.

    The tags are exploded once per query and joined to the (query, expert) rows where needed, never carried as a
    list on every (query, expert) row: at 10M score rows that list column was the plan's largest."""
    qt = queries.select("query_id", "split", "tags").explode("tags").drop_nulls("tags")
    per_tag = (soft.join(qt.filter(pl.col("split") == "train").drop("split"), on="query_id")
               .group_by("tags", "expert"))
    if tag_temperature is None:
        tag_means = per_tag.agg(pl.col("soft").mean().alias("s_t"))
    else:
        z = (pl.col("m") - pl.col("m").max().over("tags")) / tag_temperature
        tag_means = (per_tag.agg(pl.col("reward").mean().alias("m")).with_columns(z.exp().alias("_e"))
                     .with_columns((pl.col("_e") / pl.col("_e").sum().over("tags")).alias("s_t")).drop("m", "_e"))
    q_tag = (qt.select("query_id", "tags").join(tag_means, on="tags", how="inner")
             .group_by("query_id", "expert").agg(pl.col("s_t").mean().alias("s_tags")))
    return (soft.join(q_tag, on=["query_id", "expert"], how="left")
            .with_columns(pl.when(pl.col("s_tags").is_null()).then(pl.col("soft"))
                          .otherwise(beta * pl.col("soft") + (1 - beta) * pl.col("s_tags")).alias("target")))


def refit_targets(rows: pl.DataFrame, fit: pl.Series, agg: AggregateConfig) -> pl.DataFrame:
    """`rows` (labels) with `target` recomputed with the tag prior taken from the rows where `fit` is true only.
    The labels' own targets take it from every training query, the router's validation slice included: a router
    trained on those is measured on queries whose rewards shaped its targets (validation ~0.5 points optimistic on
    RouterDC, benchmarks/routerdc_shift.py), so train_router calls this with its fitted rows."""
    long = (rows.select("query_id", "rewards", "soft", pl.int_ranges(pl.col("rewards").list.len()).alias("expert"))
            .explode("rewards", "soft", "expert").rename({"rewards": "reward"}))
    split = pl.when(fit).then(pl.lit("train")).otherwise(pl.lit("held")).alias("split")
    queries = rows.select("query_id", "tags", split)
    target = (tag_enhance(long.lazy(), queries.lazy(), agg.beta, agg.tag_temperature)
              .sort("query_id", "expert").group_by("query_id", maintain_order=True).agg("target").collect())
    return rows.drop("target").join(target, on="query_id", how="left", maintain_order="left").select(rows.columns)


def labels_fingerprint(experts: list[Expert], sources: list[ScoreSource], tagger_fp: str,
                       shards: list[int], agg: AggregateConfig, test_fraction: float) -> str:
    d = {"experts": experts, "scores": [s.__dict__ for s in sources], "tagger": tagger_fp, "shards": shards,
         "beta": agg.beta, "temperature": agg.temperature, "test_fraction": test_fraction, "code": CODE_VERSION}
    if agg.tag_temperature is not None:  # only when set: labels made before the option keep their fingerprints
        d["tag_temperature"] = agg.tag_temperature
    return fingerprint(d)


def scan_scores(store: Store, experts: list[Expert], sources: list[ScoreSource],
                shards: list[int]) -> pl.LazyFrame:
    """Every score cell as one long frame: (query_id, score, expert, rm, weight)."""
    return pl.concat([
        store.scan([score_path(src.rm, src.rm_fp, name, efp, s) for s in shards])
        .with_columns(pl.lit(name).alias("expert"), pl.lit(src.rm).alias("rm"), pl.lit(src.weight).alias("weight"))
        for src in sources for name, efp in experts])


def scores_key(experts: list[Expert], sources: list[ScoreSource], shards: list[int]) -> str:
    """Names the score cells `scan_scores` reads (the test scores' file name: evaluate finds them only for its own
    experts, RMs and shards; weights change no score)."""
    return fingerprint({"experts": experts, "scores": [(s.rm, s.rm_fp) for s in sources], "shards": shards})


def label_plans(store: Store, experts: list[Expert], sources: list[ScoreSource], tagger_fp: str,
                shards: list[int], agg: AggregateConfig, test_fraction: float) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """(labels, test scores) over one scan of the score cells: one row per query with rewards / soft / target as
    lists in `experts` order; and (query_id, expert, rm, score) of the test split's queries (HELD_OUT_SCORES)."""
    q = store.scan([queries_path(s) for s in shards]).select("query_id", "text", "split").collect()
    q = q.with_columns(pl.col("split").fill_null(pl.Series(hash_split(q["query_id"].to_list(), test_fraction))))
    tags = store.scan([tags_path(tagger_fp, s) for s in shards])
    queries = q.lazy().join(tags, on="query_id", how="left").with_columns(
        pl.col("tags").fill_null(pl.lit([], dtype=pl.List(pl.String))))
    scores = scan_scores(store, experts, sources, shards)  # remote cells: fetched once, here
    rewards = combine(scores)
    target = tag_enhance(softmax(rewards, agg.temperature), queries, agg.beta, agg.tag_temperature)
    order = pl.DataFrame({"expert": [n for n, _ in experts], "_i": list(range(len(experts)))}).lazy()
    wide = (target.join(order, on="expert").sort("query_id", "_i")
            .group_by("query_id", maintain_order=True)
            .agg(pl.col("reward").alias("rewards"), pl.col("soft"), pl.col("target"), pl.len().alias("_n"))
            .filter(pl.col("_n") == len(experts)).drop("_n")
            .join(failed_queries(scores), on="query_id", how="anti"))  # a row that failed alone: left out
    test = (scores.join(q.lazy().filter(pl.col("split") == "test").select("query_id"), on="query_id")
            .select(HELD_OUT_SCORES.names))
    return queries.join(wide, on="query_id").select(LABELS.names).sort("query_id"), test


def failed_queries(scores: pl.LazyFrame) -> pl.LazyFrame:
    """The queries (query_id) with a row that failed alone under some expert or reward model (flag `error`,
    tasks/score.py): the labels leave them out; their cells are computed again by the next run."""
    return scores.filter(pl.col("flag") == ROW_FAILED).select("query_id").unique()


def out_of_range(scores: pl.LazyFrame) -> pl.LazyFrame:
    """The first score (rm, expert, query_id, score) outside [-SCORE_LIMIT, SCORE_LIMIT]: finite, but large enough
    that weights x scores could overflow (NaN/inf are null, flagged, by the score step and import)."""
    big = pl.col("score").is_not_null() & pl.col("score").is_finite() & (pl.col("score").abs() > SCORE_LIMIT)
    return scores.filter(big).select("rm", "expert", "query_id", "score").head(1)


def check_finite(labels: pl.DataFrame, experts: list[Expert]) -> None:
    """Labels never hold a non-finite reward, soft label or target (they would train a NaN router): the first
    one is an ArtifactError naming the query, the expert and the column, before anything is written."""
    for col in ("rewards", "soft", "target"):
        bad = labels.select("query_id", pl.col(col).list.eval(~pl.element().is_finite()).alias("_bad")).filter(
            pl.col("_bad").list.any())
        if bad.height:
            i = bad["_bad"][0].to_list().index(True)
            raise ArtifactError(f"labels: {col} of expert {experts[i][0]!r} on query {bad['query_id'][0]!r} is not "
                                "finite (the weighted sum of the reward models' scores overflowed); lower "
                                "reward_models.*.weight or rescale the scores; nothing was written")


def run_aggregate(store: Store, experts: list[Expert], sources: list[ScoreSource], tagger_fp: str,
                  shards: list[int], agg: AggregateConfig, test_fraction: float) -> LabelsRef:
    """Write the labels artifact unless it exists, and beside it the test queries' scores (`held_out_scores_path`:
    evaluate reads them there instead of every score cell again); returns its ref, with the rows in memory when
    computed here. A score outside [-SCORE_LIMIT, SCORE_LIMIT] or a non-finite label is an ArtifactError before
    anything is written."""
    fp = labels_fingerprint(experts, sources, tagger_fp, shards, agg, test_fraction)
    rel = labels_path(fp)
    ref = LabelsRef(fingerprint=fp, rows=0, experts=[n for n, _ in experts], aggregate=agg,
                    test_fraction=test_fraction)
    why, meta = store.cell(rel, LABELS, fp)
    if why is None and not meta.get("left_out"):  # labels that left queries out wait for their retried rows
        return ref.model_copy(update={"rows": meta["rows"]})
    big = out_of_range(scan_scores(store, experts, sources, shards))
    left = failed_queries(scan_scores(store, experts, sources, shards)).sort("query_id")
    # Polars' streaming engine: at 10M score rows about half the peak memory (1.2 vs 2.1 GiB) and half the CPU time
    # of the in-memory engine (benchmarks/aggregation.py); the labels are equal to rounding (sums may run in another
    # order -- so they do between two in-memory runs as well)
    df, test, big, left = pl.collect_all([*label_plans(store, experts, sources, tagger_fp, shards, agg,
                                                       test_fraction), big, left], engine="streaming")
    left_out = left.height
    left_key = fingerprint(left["query_id"].to_list()) if left_out else None
    if big.height:
        r = big.row(0, named=True)
        raise ArtifactError(f"reward model {r['rm']!r}: score {r['score']!r} of expert {r['expert']!r} on query "
                            f"{r['query_id']!r} is outside [-{SCORE_LIMIT:g}, {SCORE_LIMIT:g}] (the range every "
                            "score must lie in, docs/failures.md); rescale that reward model's scores")
    check_finite(df, experts)
    key = scores_key(experts, sources, shards)
    store.write_table(held_out_scores_path(fp, key), test.to_arrow(), HELD_OUT_SCORES,
                      {"stage": "held_out_scores", "fingerprint": key, "labels": fp, "rows": test.height})
    store.write_table(rel, df.to_arrow(), LABELS, {  # last: labels that exist have their test scores
        "stage": "labels", "fingerprint": fp, "experts": [n for n, _ in experts],
        "expert_fingerprints": dict(experts), "scores": [s.__dict__ for s in sources], "tagger": tagger_fp,
        **agg.model_dump(mode="json"), "test_fraction": test_fraction, "rows": df.height,
        **({"left_out": left_out, "left_out_key": left_key} if left_out else {})})
    return ref.model_copy(update={"rows": df.height, "left_out": left_out, "left_out_key": left_key}).with_frame(df)
