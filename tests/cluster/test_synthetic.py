"""The synthetic backend (benchmarks/tests only): refused without ZOOTER_ALLOW_SYNTHETIC=1, naming the config key,
before anything is written; deterministic answers and scores; cells through the real stage runner and Ray actors."""

from __future__ import annotations

import math

import pytest
import yaml

from cluster.backends import generator_builder, scorer_builder
from cluster.synthetic import SyntheticGenerator, SyntheticScorer
from schemas.artifacts import GENERATIONS, SCORES, generation_path, score_path
from schemas.config import ALLOW_SYNTHETIC, ConfigError, ExpertSpec, RewardSpec, load_config
from schemas.store import Store
from tasks.generate import expert_fingerprint, plan_expert, run_generate
from tasks.preflight import preflight
from tasks.score import plan_rm, rm_fingerprint, run_score
from tests.conftest import QUERIES, write_jsonl


def _config(tmp_path, rm_backend: str = "synthetic", expert_backend: str = "synthetic"):
    rm = {"name": "rm", "kind": "classifier", "backend": rm_backend}
    if rm_backend != "synthetic":
        rm["model"] = "packaged:all-minilm-l6-v2"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "store": str(tmp_path / "store"),
        "data": {"path": str(write_jsonl(tmp_path / "q.jsonl", QUERIES)), "id_field": "id", "shard_size": 4},
        "experts": [{"name": "a", "model": "synthetic", "backend": "hf" if expert_backend != "synthetic" else
                     "synthetic"}, {"name": "b", "model": "synthetic", "backend": expert_backend}],
        "reward_models": [{"name": "exact", "kind": "verifiable"}, rm]}))
    return path


@pytest.mark.parametrize(("expert", "rm", "key"), [("synthetic", "synthetic", "experts.0.backend"),
                                                   ("hf", "synthetic", "reward_models.1.backend")])
def test_refused_without_the_opt_in_naming_the_key(tmp_path, monkeypatch, expert, rm, key):
    monkeypatch.delenv(ALLOW_SYNTHETIC, raising=False)
    with pytest.raises(ConfigError, match=rf"{key}: backend synthetic .* set {ALLOW_SYNTHETIC}=1"):
        load_config(_config(tmp_path, rm, expert))
    assert not (tmp_path / "store").exists()


def test_preflight_refuses_a_config_validated_with_the_opt_in(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_SYNTHETIC, "1")
    cfg = load_config(_config(tmp_path))
    monkeypatch.setenv(ALLOW_SYNTHETIC, "0")
    with pytest.raises(ConfigError, match=r"^experts\.0\.backend: synthetic"):
        preflight(cfg)
    assert not (tmp_path / "store").exists()


def test_accepted_with_the_opt_in(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_SYNTHETIC, "1")
    cfg = load_config(_config(tmp_path))
    assert [e.backend for e in cfg.experts] == ["synthetic", "synthetic"]
    assert preflight(cfg).height == len(QUERIES)  # no model source is looked for
    with pytest.raises(ValueError, match="takes no `model`"):
        RewardSpec(name="r", kind="classifier", backend="synthetic", model="packaged:all-minilm-l6-v2")


def test_outputs_are_deterministic(monkeypatch):
    monkeypatch.setenv(ALLOW_SYNTHETIC, "1")
    a = generator_builder(plan_expert(ExpertSpec(name="a", model="x", backend="synthetic")))()
    prompts = [q["text"] for q in QUERIES]
    first = a.generate(prompts, max_new_tokens=20)
    assert first == a.generate(prompts, max_new_tokens=20) == SyntheticGenerator("a").generate(prompts, 20)
    assert [g.response for g in first] != [g.response for g in SyntheticGenerator("b").generate(prompts, 20)]
    assert len({g.response for g in first}) == len(prompts)
    for g in first:
        assert 8 <= g.new_tokens <= 20 and len(g.response.split()) == g.new_tokens
        assert g.finish_reason == ("length" if g.new_tokens == 20 else "stop")
    sampled = [a.generate(prompts, max_new_tokens=20, temperature=0.7, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    rm = scorer_builder(plan_rm(RewardSpec(name="r", kind="classifier", backend="synthetic")))()
    answers = [g.response for g in first]
    scores = rm.score(prompts, answers)
    assert scores == rm.score(prompts, answers) and len(set(scores)) == len(prompts)
    assert all(math.isfinite(s) and -4 <= s < 4 for s in scores)
    # the score depends on what the fingerprint covers, not on the RM's name
    renamed = scorer_builder(plan_rm(RewardSpec(name="other", kind="classifier", backend="synthetic")))()
    assert renamed.score(prompts, answers) == scores
    assert SyntheticScorer("another seed").score(prompts, answers) != scores


def test_fingerprints_cover_name_and_sampling_not_model_or_pool(monkeypatch):
    monkeypatch.setenv(ALLOW_SYNTHETIC, "1")
    base = ExpertSpec(name="a", model="x", backend="synthetic")
    fp = expert_fingerprint(base)
    assert fp == expert_fingerprint(base.model_copy(update={"model": "y", "cost": 3.0}))
    assert fp != expert_fingerprint(base.model_copy(update={"name": "b"}))
    assert fp != expert_fingerprint(ExpertSpec(name="a", model="x", backend="synthetic",
                                               sampling={"max_new_tokens": 5}))
    rm = RewardSpec(name="r", kind="classifier", backend="synthetic")
    assert rm_fingerprint(rm) == rm_fingerprint(rm.model_copy(update={"name": "s", "weight": 2.0}))


def test_stage_runner_writes_every_cell_once(tmp_path, monkeypatch, ray_session):
    """3 shards x 2 experts generation cells and 2 x 3 score cells, in Ray actors; a rerun computes nothing."""
    monkeypatch.setenv(ALLOW_SYNTHETIC, "1")
    cfg = load_config(_config(tmp_path))
    store = Store(cfg.store.url)
    from tasks.ingest import write_shards

    shards = write_shards(store, preflight(cfg), cfg.data.shard_size).shards
    assert shards == [0, 1, 2]
    gens = [run_generate(store, e, shards) for e in cfg.experts]
    assert [len(g.computed) for g in gens] == [3, 3] and all(g.rows == 12 for g in gens)
    rm = cfg.reward_models[1]
    sc = run_score(store, rm, cfg.experts, shards)
    assert len(sc.computed) == 6 and sc.rows == 24
    for e in cfg.experts:
        efp = expert_fingerprint(e)
        for s in shards:
            t = store.read_table(generation_path(e.name, efp, s), GENERATIONS)
            assert t.num_rows == 4 and all(t["response"].to_pylist())
            scores = store.read_table(score_path(rm.name, rm_fingerprint(rm), e.name, efp, s), SCORES)
            assert scores["score"].null_count == 0
    again = [run_generate(store, e, shards) for e in cfg.experts] + [run_score(store, rm, cfg.experts, shards)]
    assert [len(r.computed) for r in again] == [0, 0, 0] and [len(r.skipped) for r in again] == [3, 3, 6]
