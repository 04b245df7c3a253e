"""train_router: the train/validation slice, its targets' tag prior (fitted rows only), the fingerprint, the feature
join and the user errors before training (the Ray Train run itself: tests/cluster/test_router.py and tests/flows)."""

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from schemas.artifacts import EMBEDDINGS, LABELS, embeddings_path, labels_path
from schemas.config import AggregateConfig, RouterConfig
from schemas.errors import ArtifactError, ConfigError
from schemas.store import Store
from tasks.aggregate import refit_targets, train_val
from tasks.train_router import fit_targets, router_fingerprint, run_train_router, with_features


def test_validation_slice_is_disjoint_stable_and_train_only():
    ids = [f"q{i}" for i in range(400)]
    labels = pl.DataFrame({"query_id": ids, "split": ["test" if i % 4 == 0 else "train" for i in range(400)]})
    train, val = train_val(labels)
    assert set(train["query_id"]).isdisjoint(val["query_id"])
    assert train.height + val.height == 300 and set(train["split"]) == set(val["split"]) == {"train"}
    assert 0.08 < val.height / 300 < 0.22
    assert train_val(labels.reverse())[1]["query_id"].sort().to_list() == val["query_id"].sort().to_list()


def test_the_seed_draws_the_validation_slice_and_seed_0_keeps_the_original_one():
    ids = [f"q{i}" for i in range(400)]
    labels = pl.DataFrame({"query_id": ids, "split": ["train"] * 400})
    v0, v1 = (set(train_val(labels, seed)[1]["query_id"]) for seed in (0, 1))
    assert v0 == set(train_val(labels)[1]["query_id"])
    assert v0 != v1 and 0.08 < len(v1) / 400 < 0.22
    assert len(v0 & v1) < 0.5 * len(v0)  # independent draws overlap by about the fraction itself
    assert set(train_val(labels, 1)[1]["query_id"]) == v1


def test_tiny_training_sets_hold_nothing_out():
    labels = pl.DataFrame({"query_id": ["a", "b", "c"], "split": ["train"] * 3})
    train, val = train_val(labels)
    assert (train.height, val.height) == (3, 0)


def test_refit_targets_take_the_tag_prior_from_the_fit_rows_only():
    rows = pl.DataFrame({"query_id": ["a", "b", "c", "d"], "tags": [["t"], ["t"], ["t"], []],
                         "rewards": [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]],
                         "soft": [[0.8, 0.2], [0.4, 0.6], [0.0, 1.0], [0.7, 0.3]], "target": [[0.0, 0.0]] * 4})
    agg = AggregateConfig(beta=0.3, temperature=1.0, tag_temperature=None)
    fit = pl.Series([True, True, False, True])
    got = refit_targets(rows, fit, agg)
    assert got.columns == rows.columns and got["query_id"].to_list() == ["a", "b", "c", "d"]
    prior = [0.6, 0.4]  # mean soft of the fit rows tagged t (a, b): c is held out
    want = [[0.3 * s + 0.7 * p for s, p in zip(soft, prior, strict=True)] for soft in rows["soft"].to_list()[:3]]
    np.testing.assert_allclose(got["target"].to_list()[:3], want)
    assert got["target"].to_list()[3] == pytest.approx([0.7, 0.3])  # untagged: its own soft label
    moved = rows.with_columns(pl.Series("soft", [[0.8, 0.2], [0.4, 0.6], [1.0, 0.0], [0.7, 0.3]]))
    np.testing.assert_allclose(refit_targets(moved, fit, agg)["target"].to_list()[:2], want[:2])  # no leak


def test_the_validation_slice_shapes_no_target_the_router_fits_or_is_measured_on():
    n = 200
    soft = [[0.9, 0.1] if i % 3 else [0.2, 0.8] for i in range(n)]
    labels = pl.DataFrame({"query_id": [f"q{i}" for i in range(n)], "split": ["train"] * (n - 20) + ["test"] * 20,
                           "tags": [["even" if i % 2 == 0 else "odd"] for i in range(n)],
                           "rewards": soft, "soft": soft, "target": [[0.0, 0.0]] * n})
    agg = AggregateConfig(beta=0.3)
    train, val = fit_targets(labels, 0, agg)
    ref_train, ref_val = train_val(labels, 0)
    assert train["query_id"].to_list() == ref_train["query_id"].to_list() and val.height == ref_val.height > 0
    # the validation rows' soft labels (and the test rows') move: no fitted target and no validation prior moves
    flipped = labels.with_columns(pl.when(pl.col("query_id").is_in(ref_train["query_id"].implode())).then("soft")
                                  .otherwise(pl.col("soft").list.reverse()).alias("soft"))
    train2, val2 = fit_targets(flipped, 0, agg)
    np.testing.assert_allclose(train2["target"].to_list(), train["target"].to_list())
    every = [refit_targets(d, d["split"] == "train", agg).filter(pl.col("query_id").is_in(train["query_id"].implode()))
             for d in (labels, flipped)]  # the labels' own prior (every training query): the flip reaches it
    assert np.abs(np.array(every[0]["target"].to_list()) - np.array(every[1]["target"].to_list())).max() > 0.01
    prior = lambda v: (np.array(v["target"].to_list()) - 0.3 * np.array(v["soft"].to_list())) / 0.7  # noqa: E731
    np.testing.assert_allclose(prior(val2), prior(val))
    assert fit_targets(labels, 1, agg)[0]["query_id"].to_list() != train["query_id"].to_list()  # the seed's slice


def test_fingerprint_ignores_resources_not_hyperparameters():
    base = router_fingerprint(RouterConfig(), "labels1")
    assert base == "f26386ebe9fb"  # pinned: a change retrains every user's router (CODE_VERSION 3 meant to)
    assert base == router_fingerprint(RouterConfig(cpus_per_worker=2, use_gpu=True, num_workers=1), "labels1")
    assert base != router_fingerprint(RouterConfig(lr=1e-5), "labels1")
    assert base != router_fingerprint(RouterConfig(), "labels2")


def _embeddings(store: Store, fp: str, ids: list[str]) -> None:
    store.write_table(embeddings_path(fp, 0), pa.table({"query_id": ids, "vector": [[float(i)] * 2 for i in
                                                                                    range(len(ids))]},
                                                       schema=EMBEDDINGS), EMBEDDINGS, {"fingerprint": fp})


def test_with_features_joins_every_row_or_names_what_is_missing(tmp_path):
    store = Store(str(tmp_path))
    labels = pl.DataFrame({"query_id": ["q2", "q1"], "target": [[1.0, 0.0], [0.0, 1.0]]})
    with pytest.raises(ArtifactError, match="no embeddings e1 in .*run the embed step"):
        with_features(store, labels, "e1")
    _embeddings(store, "e1", ["q1"])
    with pytest.raises(ArtifactError, match="embeddings/e1: 1 labelled queries have no embedding"):
        with_features(store, labels, "e1")
    _embeddings(store, "e1", ["q1", "q2"])
    out = with_features(store, labels, "e1")
    assert out["query_id"].to_list() == ["q2", "q1"] and out["vector"].to_list() == [[1.0, 1.0], [0.0, 0.0]]


def test_labels_without_training_rows_are_a_config_error(tmp_path):
    store = Store(str(tmp_path))
    store.write_table(labels_path("l1"), pa.table({
        "query_id": ["q1"], "text": ["t"], "split": ["test"], "tags": [[]], "rewards": [[1.0, 0.0]],
        "soft": [[0.7, 0.3]], "target": [[0.7, 0.3]]}), LABELS, {"fingerprint": "l1", "experts": ["a", "b"], "rows": 1})
    with pytest.raises(ConfigError, match="labels l1: no training rows"):
        run_train_router(store, "l1", RouterConfig())
    assert not [p for p in (tmp_path / "leases").rglob("*") if p.is_file()]  # the router's lease was given back
