"""benchmarks/sim_cluster.py --quick: one tiny grid point of the simulated GPU cluster (declared GPUs, the synthetic
backend's latency model), ours pipelined and on Ray Data; the makespan/bound accounting and the cells it wrote. And
the latency knob itself: it sleeps the modelled time and changes no output."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.synthetic import LATENCY_ENV, Latency, SyntheticGenerator, SyntheticScorer, latency_from_env

ROOT = Path(__file__).resolve().parents[1]


def test_latency_spends_the_modelled_time_and_changes_nothing(monkeypatch):
    prompts = ["what is two plus two", "name a prime number above ten"]
    lat = Latency(prefill_tps=100.0, decode_tps=200.0, time_scale=0.5)
    plain, slow = SyntheticGenerator("a"), SyntheticGenerator("a", lat)
    t = time.perf_counter()
    got = slow.generate(prompts, max_new_tokens=20)
    took = time.perf_counter() - t
    assert got == plain.generate(prompts, max_new_tokens=20)
    tokens = sum(g.prompt_tokens for g in got), sum(g.new_tokens for g in got)
    assert took >= lat.seconds(*tokens) * lat.time_scale  # slept at least the modelled time (a lower bound)
    answers = [g.response for g in got]
    assert SyntheticScorer("s", Latency(1e6)).score(prompts, answers) == SyntheticScorer("s").score(prompts, answers)
    # from the environment, keyed by expert name / scorer seed; unset or unnamed: no latency
    monkeypatch.setenv(LATENCY_ENV, json.dumps({"time_scale": 0.1, "experts": {"a": {"prefill_tps": 5,
                                                                                     "decode_tps": 7}},
                                                "scorers": {"s": {"prefill_tps": 9}}}))
    assert SyntheticGenerator("a").latency == Latency(5, 7, 0.1)
    assert SyntheticScorer("s").latency == Latency(9, float("inf"), 0.1)
    assert SyntheticGenerator("b").latency is None and latency_from_env("scorers", "other") is None
    monkeypatch.delenv(LATENCY_ENV)
    assert SyntheticGenerator("a").latency is None


@pytest.mark.slow
def test_quick_grid_point_accounting(tmp_path):
    out = tmp_path / "sim.json"
    p = subprocess.run([sys.executable, "benchmarks/sim_cluster.py", "--quick", "--modes", "pipelined,raydata",
                        "--out", str(out), "--tmp", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["commit"] and doc["date"] and doc["machine"]["cores"] >= 1 and "load_1m" in doc["load"]
    [row] = doc["grid"]
    for mode in ("pipelined", "raydata"):
        g = row["modes"][mode]
        assert g["cells_valid"] == row["cells_expected"]  # every generation and score cell written, valid
        assert g["bound_s"] == max(g["gpu_s_over_gpus"], g["longest_chain_s"]) > 0
        assert g["makespan_s"] >= g["bound_s"]  # nothing beats the lower bound
        assert g["job_gpu_s"] >= 0.99 * g["gpu_s"]  # the jobs spent the modelled time (the latency model ran)
        assert 0 <= g["busy"] <= 1 and g["ratio"] == round(g["makespan_s"] / g["bound_s"], 3)
    assert all(b is None or 0 <= b <= 1 for b in row["modes"]["pipelined"]["pool_busy"].values())
    assert row["raydata_over_ours"] == round(row["modes"]["raydata"]["makespan_s"] /
                                             row["modes"]["pipelined"]["makespan_s"], 3)
    assert "| pipelined |" in p.stdout and "| raydata |" in p.stdout  # the grid table
