"""score: the verifiable reward, the loglik scorer against a brute-force computation, the classifier RM path,
the cell job on a fake scorer and the in-process verifiable stage."""

import pyarrow as pa
import pytest
import torch

from cluster.hf import HFClassifierScorer, HFLoglikScorer, render_chat
from schemas.artifacts import GENERATIONS, QUERIES, SCORES, generation_path, queries_path, score_path
from schemas.config import ExpertSpec, RewardSpec
from schemas.plan import PlannedExpert
from schemas.store import Store
from tasks.score import rm_fingerprint, run_score, score_cell, verify


@pytest.mark.parametrize("answer,ref,want", [
    ("7 + 5 = 12.", "12", 1.0), ("It costs $12,000 in total", "12000", 1.0), ("x = 38", "38", 1.0),
    ("about 19%", "19", 1.0), ("first 3 then 4", "3", 0.0), ("no number", "5", 0.0),
    ("The capital is Paris.", "paris", 1.0), ("Lyon", "Paris", 0.0), ("anything", None, None),
    ("anything", "  ", None),
])
def test_verify(answer, ref, want):
    assert verify(answer, ref) == want


def test_loglik_scorer_matches_unbatched_brute_force(tiny_models):
    s = HFLoglikScorer(str(tiny_models["lm_a"]), dtype="float32")
    qs = ["What is 2 + 3?", "Write a long line about the weather today please", "Hi"]
    ans = ["five", "It rains and rains over the hills", ""]
    got = s.score(qs, ans, batch_size=3)
    assert got[2] is None  # an empty answer has no per-token mean
    for q, a, g in zip(qs[:2], ans[:2], got[:2], strict=True):
        p = s.tok(render_chat(s.tok, q), add_special_tokens=False)["input_ids"]
        aa = s.tok(a, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(s.model(torch.tensor([p + aa])).logits.float(), -1)[0]
        want = float(torch.stack([lp[len(p) - 1 + j, aa[j]] for j in range(len(aa))]).mean())
        assert g == pytest.approx(want, abs=1e-4)


def test_classifier_rm_scores_raw_logits(tiny_models):
    s = HFClassifierScorer(str(tiny_models["rm"]), dtype="float32")
    a = s.score(["q1", "q2"], ["short", "a much longer answer here"], batch_size=2)
    b = s.score(["q2"], ["a much longer answer here"], batch_size=1)
    assert len(a) == 2 and all(isinstance(x, float) for x in a)
    assert a[1] == pytest.approx(b[0], abs=1e-4)  # batching/padding does not change a score


def test_causal_lm_is_not_a_classifier_rm(tiny_models):
    with pytest.raises(Exception):  # noqa: B017 - transformers raises its own type for a wrong architecture
        HFClassifierScorer(str(tiny_models["lm_a"]), dtype="float32")


def test_rm_fingerprint_ignores_weight_and_resources(tiny_models):
    base = RewardSpec(name="j", kind="loglik", model=str(tiny_models["lm_a"]))
    same = RewardSpec(name="j2", kind="loglik", model=str(tiny_models["lm_a"]), weight=3.0,
                      resources={"pool_size": 4, "batch_size": 2})
    other = RewardSpec(name="j", kind="loglik", model=str(tiny_models["lm_a"]), max_length=64)
    assert rm_fingerprint(base) == rm_fingerprint(same) != rm_fingerprint(other)


def _cells(tmp_path):
    """A query shard and expert a's generation cell, stored in another order than the shard."""
    store = Store(str(tmp_path))
    store.write_table(queries_path(0), pa.table({
        "query_id": ["q1", "q2", "q3"], "text": ["What is 2 + 3?", "Say hi", "Name a colour"],
        "input_tags": [[]] * 3, "reference": ["5", None, None], "split": [None] * 3, "source_line": [1, 2, 3]}),
        QUERIES)
    store.write_table(generation_path("a", "efp", 0), pa.table({
        "query_id": ["q3", "q1", "q2"], "response": ["red", "It is 5.", " "], "prompt_tokens": [1, 1, 1],
        "new_tokens": [1, 3, 1], "finish_reason": ["stop"] * 3}), GENERATIONS)
    return store


class FakeScorer:
    backend = "fake"

    def score(self, queries, answers, batch_size):
        return [float("nan") if a == "red" else float(len(q)) for q, a in zip(queries, answers, strict=True)]


def test_score_cell_aligns_flags_and_records_the_backend(tmp_path):
    store = _cells(tmp_path)
    rm = RewardSpec(name="j", kind="classifier", model="x")
    out = score_cell(FakeScorer(), ("a", 0), rm=rm, rm_fp="rfp", expert_fps={"a": "efp"}, store=store)
    assert out["rows"] == 3 and out["flags"] == {"empty_response": 1, "nonfinite": 1}
    rel = score_path("j", "rfp", "a", "efp", 0)
    t = store.read_table(rel, SCORES)
    assert t["query_id"].to_pylist() == ["q1", "q2", "q3"]  # the shard's order
    assert t["score"].to_pylist() == [14.0, None, None] and t["flag"].to_pylist() == [None, "empty_response",
                                                                                     "nonfinite"]
    meta = store.read_meta(rel)
    assert (meta["backend_used"], meta["expert_fingerprint"], meta["fingerprint"]) == ("fake", "efp", "rfp")


def test_verifiable_reward_runs_in_process_keyed_by_expert_and_shard(tmp_path):
    store = _cells(tmp_path)
    # as a run's plan has it: the fingerprint resolved already (no model files needed)
    expert = PlannedExpert(spec=ExpertSpec(name="a", model="unused"), fingerprint="efp", identity=None)
    rm = RewardSpec(name="exact", kind="verifiable")
    res = run_score(store, rm, [expert], [0])
    assert (res.computed, res.rows, res.nodes) == ([("a", 0)], 3, [])
    rel = score_path("exact", rm_fingerprint(rm), "a", "efp", 0)
    assert store.read_table(rel, SCORES)["score"].to_pylist() == [1.0, None, None]
    assert store.read_meta(rel)["backend_used"] is None
    assert run_score(store, rm, [expert], [0]).skipped == [("a", 0)]
