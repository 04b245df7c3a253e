"""train_router: the train/validation slice and the fingerprint (the Ray Train run is covered in tests/flows)."""

import polars as pl

from schemas.config import RouterConfig
from tasks.train_router import router_fingerprint, train_val


def test_validation_slice_is_disjoint_stable_and_train_only():
    ids = [f"q{i}" for i in range(400)]
    labels = pl.DataFrame({"query_id": ids, "split": ["test" if i % 4 == 0 else "train" for i in range(400)]})
    train, val = train_val(labels)
    assert set(train["query_id"]).isdisjoint(val["query_id"])
    assert train.height + val.height == 300 and set(train["split"]) == set(val["split"]) == {"train"}
    assert 0.08 < val.height / 300 < 0.22
    assert train_val(labels.reverse())[1]["query_id"].sort().to_list() == val["query_id"].sort().to_list()


def test_tiny_training_sets_hold_nothing_out():
    labels = pl.DataFrame({"query_id": ["a", "b", "c"], "split": ["train"] * 3})
    train, val = train_val(labels)
    assert (train.height, val.height) == (3, 0)


def test_fingerprint_ignores_resources_not_hyperparameters():
    base = router_fingerprint(RouterConfig(), "labels1")
    assert base == router_fingerprint(RouterConfig(cpus_per_worker=2, use_gpu=True), "labels1")
    assert base != router_fingerprint(RouterConfig(lr=1e-5), "labels1")
    assert base != router_fingerprint(RouterConfig(), "labels2")
