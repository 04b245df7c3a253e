"""benchmarks/routerdc_seeds.py: where each config's results go, and the seeds summary (mean, sd with ddof 1)."""

from __future__ import annotations

import sys
from pathlib import Path

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
