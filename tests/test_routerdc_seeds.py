"""benchmarks/routerdc_seeds.py: where each config's results go, and the seeds summary (mean, sd with ddof 1);
benchmarks/routerdc_cv.py: its folds and its in-process fit (= Ray Train's);
benchmarks/routerdc_shift.py: within-task clusters and their routing gain;
benchmarks/routerdc_unfreeze.py: cached lower-layer states through the trained top layer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from routerdc_seeds import CONFIG, ROOT, results_path, summarise  # noqa: E402


def test_results_path_per_config() -> None:
    out = ROOT / "benchmarks/results"
    assert results_path(CONFIG) == out / "routerdc_seeds.json"  # the task-tag result keeps its file
    assert results_path(ROOT / "examples/routerdc-cluster.yaml") == out / "routerdc_seeds_cluster.json"
    assert results_path(Path("/x/routerdc-llm-tags.yaml")) == out / "routerdc_seeds_llm_tags.json"


def test_summarise_mean_and_sample_sd() -> None:
    runs = [{"seed": s, "val_avg": v, "test_avg": t, "test": {"a": t, "b": 2 * t}}
            for s, v, t in [(0, 1.0, 10.0), (1, 3.0, 12.0), (2, 2.0, 14.0)]]
    s = summarise(runs)
    assert s["seeds"] == [0, 1, 2]
    assert s["val_avg"] == {"mean": pytest.approx(2.0), "sd": pytest.approx(1.0)}
    assert s["test"]["b"] == {"mean": pytest.approx(24.0), "sd": pytest.approx(4.0)}
    assert summarise(runs[:1])["test_avg"]["sd"] == 0.0  # one seed: no spread, not NaN


# --- benchmarks/routerdc_cv.py: K-fold selection --------------------------------------------------------------

def test_folds_cover_every_query_once_balanced_per_stratum_and_drawn_by_the_seed() -> None:
    from routerdc_cv import folds

    ids = pl.Series([f"q{i}" for i in range(103)])
    strata = pl.Series(["a"] * 61 + ["b"] * 42)
    f = folds(ids, strata, 5, seed=0)
    assert f.len() == 103 and set(f.to_list()) == set(range(5))  # one fold per query, every fold used
    sizes = pl.DataFrame({"s": strata, "f": f}).group_by("s", "f").len()
    assert sizes.group_by("s").agg((pl.col("len").max() - pl.col("len").min()).alias("d"))["d"].max() <= 1
    assert f.equals(folds(ids, strata, 5, seed=0))  # deterministic
    assert not f.equals(folds(ids, strata, 5, seed=1))  # another seed deals other folds


def test_paired_test_gap_averages_tasks_and_seeds_and_resamples_within_tasks() -> None:
    from routerdc_cv import paired_test_gap

    tasks = pl.Series(["x", "x", "y", "y", "y", "y"])
    a = [np.array([1, 0, 1, 1, 0, 0.0]), np.array([1, 1, 1, 0, 0, 0.0])]
    b = [np.array([0, 0, 1, 1, 0, 0.0]), np.array([0, 0, 1, 1, 0, 0.0])]
    got = paired_test_gap(a, b, tasks, boot=500)
    # seed 0: x +0.5, y 0 -> +25; seed 1: x +1.0, y -0.25 -> +37.5; the gap is their mean, task by task
    assert got["per_seed"] == pytest.approx([25.0, 37.5]) and got["gap"] == pytest.approx(31.25)
    lo, hi = got["ci95"]
    assert lo <= got["gap"] <= hi and got["boot_sd"] > 0
    same = paired_test_gap(a, a, tasks)  # a point against itself: no gap and no spread
    assert same["gap"] == 0 and same["boot_sd"] == 0 and same["ci95"] == [0, 0]
    assert paired_test_gap(a, b, tasks, boot=500) == got  # the bootstrap's draw is fixed


# --- benchmarks/routerdc_shift.py: does the training split's sub-task structure hold on test? -----------------

def test_route_gain_routes_each_cluster_to_its_fit_best_against_the_tasks_fit_best() -> None:
    from routerdc_shift import route_gain

    # one task, two clusters; expert 0 is the task's best on the fit rows (3/4 vs 2/4), expert 1 leads cluster 1
    r = np.array([[1, 0], [1, 0], [1, 1], [0, 1],    # fit: cluster 0, 0, 1, 1
                  [0, 1], [1, 0], [0, 1], [0, 0]],   # scored: cluster 0, 0, 1, 2 (2: no fit rows -> task best)
                 dtype=float)
    task = np.array(["t"] * 8)
    cluster = np.array([0, 0, 1, 1, 0, 0, 1, 2])
    fit = np.arange(8) < 4
    # clusters: picks 0, 0, 1, 0 -> credits 0, 1, 1, 0 (mean 0.5); task best (0) everywhere: 0, 1, 0, 0 (0.25)
    assert route_gain(r, task, cluster, fit, ~fit) == pytest.approx(25.0)
    two = np.concatenate([task, np.array(["u"] * 8)])  # a second task, the same rows: the gain is averaged per task
    assert route_gain(np.vstack([r, r[:, ::-1]]), two, np.tile(cluster, 2), np.tile(fit, 2),
                      ~np.tile(fit, 2)) == pytest.approx(25.0)


def test_task_clusters_stay_inside_their_task_and_take_centroids_from_the_fit_rows() -> None:
    from routerdc_shift import task_clusters

    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal([5, 0], 0.1, (6, 2)), rng.normal([-5, 0], 0.1, (6, 2))])
    x = np.vstack([x, x])  # task a, then the same points as task b
    task = np.array(["a"] * 12 + ["b"] * 12)
    fit = np.tile(np.arange(12) % 2 == 0, 2)  # half of each task fits the centroids; all rows get a cluster
    got = task_clusters(x, task, fit, 2, seed=0)
    for t in ("a", "b"):
        c = got[task == t]
        assert len(set(c[:6])) == 1 and len(set(c[6:])) == 1 and c[0] != c[6]  # the two blobs, every row
    np.testing.assert_array_equal(got, task_clusters(x, task, fit, 2, seed=0))  # deterministic


# --- benchmarks/routerdc_unfreeze.py: the encoder's top layers trained on cached lower states ----------------

def test_cached_lower_states_through_the_top_layer_give_the_encoders_own_features() -> None:
    import torch
    from routerdc_unfreeze import Top, batches, below
    from transformers import AutoTokenizer, BertConfig, BertModel

    from cluster.router import RouterHead, RouterModel, embed_texts
    from tests.conftest import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=2)).eval()
    texts = ["short", "a somewhat longer query about routing", "x " * 40, "日本語の質問", "two words"]
    cfg = type("Cfg", (), {"prefix": "query: ", "max_length": 16})
    states = below(enc, tok, texts, cfg, layers=1, batch=2)  # length-sorted batches of 2: padding differs
    assert [len(s) for s in states] == [len(tok("query: " + t, truncation=True, max_length=16)["input_ids"])
                                        for t in texts]
    top = Top(enc, 1, RouterHead(32, 3)).eval()
    seen, got = [], np.zeros((len(texts), 32), dtype=np.float32)
    with torch.no_grad():
        for rows, h, mask in batches(states, np.arange(len(texts)), 3, np.random.default_rng(0)):
            seen += rows.tolist()
            got[rows] = top.features(h, mask).numpy()
    assert sorted(seen) == list(range(len(texts)))  # every row once
    want = embed_texts(RouterModel(enc, 1, "mean"), tok, texts, 16, "query: ", 8)  # as the embed step runs it
    np.testing.assert_allclose(got, want, atol=1e-2)  # float16 cache
    top.train()
    top.layers[0].output.dense.weight.data.add_(1.0)  # the trained layer is a copy: the encoder is untouched
    assert not torch.equal(top.layers[0].output.dense.weight, enc.encoder.layer[-1].output.dense.weight)

