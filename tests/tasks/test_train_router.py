"""train_router: the train/validation slice, the fingerprint, the feature join and the user errors before training
(the Ray Train run itself: tests/cluster/test_router.py and tests/flows)."""

import polars as pl
import pyarrow as pa
import pytest

from schemas.artifacts import EMBEDDINGS, LABELS, embeddings_path, labels_path
from schemas.config import RouterConfig
from schemas.errors import ArtifactError, ConfigError
from schemas.store import Store
from tasks.aggregate import train_val
from tasks.train_router import router_fingerprint, run_train_router, with_features


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


def test_fingerprint_ignores_resources_not_hyperparameters():
    base = router_fingerprint(RouterConfig(), "labels1")
    assert base == "5d8852e5dddd"  # existing stores keep their routers
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
        "soft": [[0.7, 0.3]], "target": [[0.7, 0.3]]}), LABELS, {"fingerprint": "l1", "experts": ["a", "b"]})
    with pytest.raises(ConfigError, match="labels l1: no training rows"):
        run_train_router(store, "l1", RouterConfig())
    assert not [p for p in (tmp_path / "leases").rglob("*") if p.is_file()]  # the router's lease was given back
