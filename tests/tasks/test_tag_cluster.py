"""tag, kind cluster: k-means over the router encoder's cached features of the training queries only."""

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from schemas.artifacts import EMBEDDINGS, QUERIES, TAGS, embeddings_path, queries_path, tags_path
from schemas.config import RouterConfig, TaggerConfig, TrainConfig
from schemas.errors import ConfigError
from schemas.store import Store
from tasks.embed import embed_fingerprint
from tasks.tag import ClusterTagger, kmeans, make_tagger, nearest, run_tag, splits, unit_rows

ROUTER = RouterConfig(encoder="packaged:all-minilm-l6-v2", freeze_encoder=True, max_length=32)


def _direction(deg: float, rng: np.random.Generator) -> list[float]:
    a = np.deg2rad(deg + rng.normal(0, 3))
    return [float(np.cos(a)), float(np.sin(a)), 0.0]


def _store(tmp_path, name: str = "store") -> Store:
    """Two shards; training queries point at 0 or 90 degrees, the test queries all at 180 degrees (a third
    group that a fit on all queries would give its own cluster). Their features are written as the embed step's
    cells under the router's embed fingerprint, so the tagger reuses them and loads no encoder."""
    s, rng, fp = Store(str(tmp_path / name)), np.random.default_rng(0), embed_fingerprint(ROUTER)
    for shard in range(2):
        ids = [f"{shard}-{i}" for i in range(12)]
        split = ["train"] * 8 + ["test"] * 4
        vec = [_direction(0 if i % 2 else 90, rng) if i < 8 else _direction(180, rng) for i in range(12)]
        s.write_table(queries_path(shard), pa.table({
            "query_id": ids, "text": [f"q {q}" for q in ids], "input_tags": [[]] * 12, "reference": [None] * 12,
            "split": split, "source_line": list(range(1, 13))}), QUERIES)
        s.write_table(embeddings_path(fp, shard), pa.table({
            "query_id": ids, "vector": pa.array(vec, pa.list_(pa.float32()))}), EMBEDDINGS,
            {"stage": "embeddings", "fingerprint": fp, "shard": shard})
    return s


def _tagger(**cfg) -> ClusterTagger:
    return make_tagger(TaggerConfig(kind="cluster", **{"k": 2, **cfg}),
                       TrainConfig(store={"url": "unused"}, router=ROUTER))


def _tags(s: Store, fp: str) -> pl.DataFrame:
    return pl.concat([pl.from_arrow(s.read_table(tags_path(fp, k), TAGS)) for k in (0, 1)])


def test_kmeans_is_deterministic_and_finds_separated_groups():
    rng = np.random.default_rng(1)
    x = np.vstack([rng.normal(m, 0.1, (30, 3)) for m in (0.0, 5.0, 10.0)])
    c = kmeans(x, 3, seed=7)
    assert np.array_equal(c, kmeans(x, 3, seed=7))  # bit-identical for a seed
    assert sorted(np.bincount(nearest(x, c)).tolist()) == [30, 30, 30]


def test_tags_are_nearest_training_centroids_and_test_queries_shape_nothing(tmp_path):
    s = _store(tmp_path)
    tagger = _tagger()
    res = run_tag(s, tagger, [0, 1])
    assert res.computed == [0, 1] and res.rows == 24 and tagger.fingerprint.startswith("cluster-")
    q = pl.concat([pl.from_arrow(s.read_table(queries_path(k), QUERIES)) for k in (0, 1)])
    e = pl.concat([pl.from_arrow(s.read_table(embeddings_path(embed_fingerprint(ROUTER), k), EMBEDDINGS))
                   for k in (0, 1)])
    train = unit_rows(np.array(e.filter(q["split"] == "train")["vector"].to_list()))
    assert np.array_equal(tagger.centroids, kmeans(train, 2, seed=0))  # fitted on the training rows alone
    tags = _tags(s, tagger.fingerprint).join(q.select("query_id", "split"), on="query_id")
    train_tags = set(tags.filter(pl.col("split") == "train")["tags"].list.first())
    assert train_tags == {"c00", "c01"}  # the two training directions, one cluster each
    assert tags.filter(pl.col("split") == "test")["tags"].list.len().to_list() == [1] * 8
    assert set(tags.filter(pl.col("split") == "test")["tags"].list.first()) <= train_tags


def test_same_inputs_same_tags_and_done_cells_skip_the_fit(tmp_path):
    a, b = _store(tmp_path, "a"), _store(tmp_path, "b")
    ta, tb = _tagger(), _tagger()
    run_tag(a, ta, [0, 1])
    run_tag(b, tb, [0, 1])
    assert ta.fingerprint == tb.fingerprint
    assert _tags(a, ta.fingerprint).equals(_tags(b, tb.fingerprint))
    again = _tagger()
    res = run_tag(a, again, [0, 1])
    assert (res.computed, res.skipped, again.centroids) == ([], [0, 1], None)  # valid cells: no embed, no fit


def test_fingerprint_covers_k_seed_encoder_and_the_training_set(tmp_path):
    s = _store(tmp_path)

    def fp(tagger: ClusterTagger, shards=(0, 1)) -> str:
        return tagger.fit_fingerprint(splits(s, list(shards), tagger.test_fraction))

    base = fp(_tagger())
    assert base == fp(_tagger())
    assert base != fp(_tagger(k=3))
    assert base != fp(_tagger(seed=1))
    assert base != fp(_tagger(), shards=(0,))  # fitted on other queries
    assert base != ClusterTagger(TaggerConfig(kind="cluster", k=2), ROUTER, 0.5).fit_fingerprint(
        splits(s, [0, 1], 0.5).with_columns(pl.lit("train").alias("split")))
    tagger = _tagger()
    run_tag(s, tagger, [0, 1])
    assert tagger.fingerprint == base  # what the cells are written under
    other = ClusterTagger(TaggerConfig(kind="cluster", k=2), ROUTER.model_copy(update={"prefix": "query: "}), 0.25)
    assert base != fp(other)  # another encoder input: other features
    same = ClusterTagger(TaggerConfig(kind="cluster", k=2), ROUTER.model_copy(update={"epochs": 9, "lr": 1.0}), 0.25)
    assert base == fp(same)  # the head's training settings do not change the encoder's features


def test_cluster_tagger_needs_the_flow_config():
    with pytest.raises(ConfigError, match="tagger.kind cluster"):
        make_tagger(TaggerConfig(kind="cluster"))
