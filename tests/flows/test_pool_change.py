"""Changing the expert pool computes only the missing cells: add an expert, then remove one (on a copy of the
session's labelled store)."""

import polars as pl
import pytest
import yaml

from flows.label import label_flow
from schemas.artifacts import LABELS, generation_path, labels_path, router_dir
from schemas.store import Store
from tests.conftest import copy_labeled, tiny_router

pytestmark = pytest.mark.slow


def _computed(m: dict) -> dict[str, int]:
    return {f"{stage}:{s['name']}": s["cells_computed"] for stage in ("generate", "score") for s in m[stage]}


def test_add_then_remove_an_expert(tmp_path, tiny_models, labeled):
    # a store labelled with experts a and b; each pool's router is fitted on the tiny encoder (its experts are checked)
    path = copy_labeled(labeled, tmp_path, tiny_models, router=tiny_router(tiny_models))
    cfg = yaml.safe_load(path.read_text())
    first = labeled.outcome.manifest.model_dump(mode="json")
    assert _computed(first) == {"generate:a": 3, "generate:b": 3, "score:judge": 6, "score:rm": 6, "score:exact": 6}

    # add expert c (lm_b with another prompt: a new fingerprint): only c's generations and scores are computed
    cfg["experts"].append({**cfg["experts"][1], "name": "c", "prompt": "fewshot_qa"})
    path.write_text(yaml.safe_dump(cfg))
    second = label_flow(str(path)).manifest.model_dump(mode="json")
    assert _computed(second) == {"generate:a": 0, "generate:b": 0, "generate:c": 3,
                                 "score:judge": 3, "score:rm": 3, "score:exact": 3}
    store = Store(cfg["store"])
    labels = pl.from_arrow(store.read_table(labels_path(second["labels"]), LABELS))
    assert labels["target"].list.len().unique().to_list() == [3]
    assert store.read_json(f"{router_dir(second['router'])}/router.json")["experts"] == ["a", "b", "c"]

    # remove b: nothing is computed, b's cells stay in the store but leave the labels
    cfg["experts"] = [e for e in cfg["experts"] if e["name"] != "b"]
    path.write_text(yaml.safe_dump(cfg))
    third = label_flow(str(path)).manifest.model_dump(mode="json")
    assert sum(_computed(third).values()) == 0
    assert store.read_meta(labels_path(third["labels"]))["experts"] == ["a", "c"]
    b = next(g for g in first["generate"] if g["name"] == "b")
    assert store.exists(generation_path("b", b["fingerprint"], 0))
