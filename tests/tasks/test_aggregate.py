"""The label math: softmax, tag means, beta edge cases, null handling, on hand-computed values."""

import math

import polars as pl
import pyarrow as pa
import pytest

from schemas.artifacts import LABELS, QUERIES, SCORES, TAGS, labels_path, queries_path, score_path, tags_path
from schemas.config import AggregateConfig
from schemas.errors import ArtifactError
from schemas.store import Store
from tasks.aggregate import (
    ScoreSource,
    check_finite,
    combine,
    hash_split,
    labels_fingerprint,
    run_aggregate,
    softmax,
    tag_enhance,
)


def _rewards(rows):
    return pl.DataFrame(rows, schema=["query_id", "expert", "reward"], orient="row").lazy()


def test_softmax_matches_hand_computation():
    out = softmax(_rewards([("q", "a", 1.0), ("q", "b", 2.0), ("q", "c", 0.0)]), 1.0).collect().sort("expert")
    z = [math.exp(1), math.exp(2), math.exp(0)]
    assert out["soft"].to_list() == pytest.approx([v / sum(z) for v in z])


def test_softmax_temperature_sharpens_and_flattens():
    r = _rewards([("q", "a", 1.0), ("q", "b", 0.0)])
    hot = softmax(r, 10.0).collect().sort("expert")["soft"][0]
    cold = softmax(r, 0.1).collect().sort("expert")["soft"][0]
    assert hot == pytest.approx(math.exp(0.1) / (math.exp(0.1) + 1))
    assert 0.5 < hot < cold < 1.0


def test_softmax_is_stable_for_large_rewards():
    out = softmax(_rewards([("q", "a", 1000.0), ("q", "b", 999.0)]), 1.0).collect().sort("expert")
    assert out["soft"].to_list() == pytest.approx([1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))])


def _soft():
    # two train queries tagged "t" and one test query tagged "t" plus an unseen tag
    return pl.DataFrame({
        "query_id": ["q1", "q1", "q2", "q2", "q3", "q3"],
        "expert": ["a", "b"] * 3,
        "soft": [0.8, 0.2, 0.4, 0.6, 0.1, 0.9],
    }).lazy()


def _queries():
    return pl.DataFrame({"query_id": ["q1", "q2", "q3"], "split": ["train", "train", "test"],
                         "tags": [["t"], ["t", "u"], ["t", "new"]]}).lazy()


def _target(beta):
    out = tag_enhance(_soft(), _queries(), beta).collect().sort("query_id", "expert")
    return {(r["query_id"], r["expert"]): r["target"] for r in out.iter_rows(named=True)}


def test_tag_enhancement_hand_computed():
    # s_t(a) = mean(0.8, 0.4) = 0.6, s_u(a) = 0.4 (only q2 is tagged u); beta = 0.3
    t = _target(0.3)
    assert t[("q1", "a")] == pytest.approx(0.3 * 0.8 + 0.7 * 0.6)
    assert t[("q2", "a")] == pytest.approx(0.3 * 0.4 + 0.7 * (0.6 + 0.4) / 2)
    # q3 is a test query: its tags use the train means; the unseen tag "new" is ignored
    assert t[("q3", "b")] == pytest.approx(0.3 * 0.9 + 0.7 * 0.4)
    for q in ("q1", "q2", "q3"):
        assert t[(q, "a")] + t[(q, "b")] == pytest.approx(1.0)


def test_beta_one_is_plain_soft_labels_and_beta_zero_is_tag_means():
    t1, t0 = _target(1.0), _target(0.0)
    assert t1[("q2", "b")] == pytest.approx(0.6)
    assert t0[("q1", "a")] == pytest.approx(0.6)
    assert t0[("q2", "a")] == pytest.approx(0.5)


def test_query_without_known_tags_keeps_its_soft_label():
    q = pl.DataFrame({"query_id": ["q1", "q2", "q3"], "split": ["train", "train", "test"],
                      "tags": [[], [], ["never-seen"]]}).lazy()
    out = tag_enhance(_soft(), q, 0.3).collect().sort("query_id", "expert")
    assert out["target"].to_list() == pytest.approx(out["soft"].to_list())


def test_combine_weights_and_null_rule():
    scores = pl.DataFrame({
        "query_id": ["q", "q", "q", "q", "q", "q", "z", "z"],
        "expert": ["a", "a", "b", "b", "c", "c", "a", "b"],
        "weight": [1.0, 2.0] * 4,
        "score": [0.5, 1.0, -1.0, None, None, None, None, None],
    }).lazy()
    out = combine(scores).collect().sort("query_id", "expert")
    got = {(r["query_id"], r["expert"]): r["reward"] for r in out.iter_rows(named=True)}
    assert got[("q", "a")] == pytest.approx(0.5 + 2 * 1.0)
    assert got[("q", "b")] == pytest.approx(-1.0)  # the null score is left out
    assert got[("q", "c")] == pytest.approx(-1.0)  # no score at all: the query's lowest reward
    assert not any(q == "z" for q, _ in got)  # nobody scored z: dropped


def test_hash_split_is_stable_and_roughly_proportional():
    ids = [f"id{i}" for i in range(2000)]
    a, b = hash_split(ids, 0.25), hash_split(list(reversed(ids)), 0.25)
    assert a == list(reversed(b))
    assert 0.2 < a.count("test") / len(ids) < 0.3


def test_tag_temperature_uses_a_softmax_of_the_tags_mean_reward():
    # rewards: q1 (a 1, b 0), q2 (a 0, b 0.5): tag t means a 0.5, b 0.25; tag u (q2 only) a 0, b 0.5
    soft = _soft().with_columns(pl.Series("reward", [1.0, 0.0, 0.0, 0.5, 0.3, 0.3]))
    out = tag_enhance(soft, _queries(), 0.0, tag_temperature=0.1).collect().sort("query_id", "expert")
    t = {(r["query_id"], r["expert"]): r["target"] for r in out.iter_rows(named=True)}
    s_t_a = math.exp(0.5 / 0.1) / (math.exp(0.5 / 0.1) + math.exp(0.25 / 0.1))
    s_u_a = math.exp(0.0) / (math.exp(0.0) + math.exp(0.5 / 0.1))
    assert t[("q1", "a")] == pytest.approx(s_t_a)
    assert t[("q2", "a")] == pytest.approx((s_t_a + s_u_a) / 2)
    assert t[("q3", "a")] == pytest.approx(s_t_a)  # test query: train tag statistics only
    # a sharp prior: the tag's best expert dominates where the paper's mean of s(q) would be 0.6 / 0.4
    assert t[("q1", "a")] > 0.9


EXPERTS = [("a", "fa1"), ("b", "fb2")]
SOURCES = [ScoreSource("rm", "r1", 1.0), ScoreSource("judge", "j2", 0.5)]


def test_labels_fingerprint_is_unchanged_by_the_typed_config():
    # Values computed by the positional-float signature before AggregateConfig: existing stores keep their labels.
    fp = lambda agg: labels_fingerprint(EXPERTS, SOURCES, "tagfp", [0, 1], agg, 0.25)  # noqa: E731
    assert fp(AggregateConfig(beta=0.3, temperature=1.0)) == "d38335fc72c3"
    assert fp(AggregateConfig(beta=0.3, temperature=1.0, tag_temperature=0.05)) == "b5c5a9600a5c"
    assert fp(AggregateConfig(beta=0.5)) != fp(AggregateConfig(beta=0.3))


def test_run_aggregate_writes_labels_in_expert_order_once(tmp_path):
    store = _score_store(tmp_path, {"a": [1.0, 0.0], "b": [0.0, 2.0]})
    agg = AggregateConfig(beta=1.0)
    ref = run_aggregate(store, EXPERTS, SOURCES[:1], "tagfp", [0], agg, 0.25)
    fp, rows = ref.fingerprint, ref.rows
    assert (fp, rows) == (labels_fingerprint(EXPERTS, SOURCES[:1], "tagfp", [0], agg, 0.25), 2)
    df = pl.from_arrow(store.read_table(labels_path(fp), LABELS))
    assert df["rewards"].to_list() == [[1.0, 0.0], [0.0, 2.0]]  # a, b order
    assert df["target"].to_list()[1] == pytest.approx([1 / (1 + math.exp(2)), 1 / (1 + math.exp(-2))])
    meta = store.read_meta(labels_path(fp))
    assert (meta["experts"], meta["beta"], meta["tag_temperature"]) == (["a", "b"], 1.0, None)
    again = run_aggregate(store, EXPERTS, SOURCES[:1], "tagfp", [0], agg, 0.25)  # reused: read from the footer
    assert (again.fingerprint, again.rows, again.aggregate, again.experts) == (fp, 2, agg, [e for e, _ in EXPERTS])
    assert again.frame(store).equals(ref.frame(store))


def _score_store(tmp_path, scores: dict[str, list[float]]) -> Store:
    """Two queries (train, test), tags, and one `rm` score cell per expert holding `scores`."""
    store = Store(str(tmp_path / "store"))
    ids = ["q1", "q2"]
    store.write_table(queries_path(0), pa.table({
        "query_id": ids, "text": ["one", "two"], "input_tags": [[], []], "reference": [None, None],
        "split": ["train", "test"], "source_line": [1, 2]}), QUERIES)
    store.write_table(tags_path("tagfp", 0), pa.table({"query_id": ids, "tags": [["t"], ["t"]]}), TAGS)
    for name, efp in EXPERTS:
        store.write_table(score_path("rm", "r1", name, efp, 0),
                          pa.table({"query_id": ids, "score": scores[name], "flag": [None, None]}), SCORES)
    return store


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_weights_times_scores_that_overflow_never_write_a_non_finite_label(tmp_path):
    """Huge finite weights and scores (both within float range) whose weighted sum is inf: an error naming the
    expert and query, and no labels or test scores written (the config bounds weights; this is the guard)."""
    store = _score_store(tmp_path, {"a": [1e300, 0.0], "b": [0.0, 1.0]})
    before = _files(tmp_path / "store")
    with pytest.raises(ArtifactError, match=r"reward model 'rm': score 1e\+300 of expert 'a' on query 'q1' is outside "
                                            r"\[-1e\+06, 1e\+06\]"):
        run_aggregate(store, EXPERTS, [ScoreSource("rm", "r1", 1.0)], "tagfp", [0], AggregateConfig(), 0.25)
    store = _score_store(tmp_path / "w", {"a": [1e6, 0.0], "b": [0.0, 1.0]})  # a score in range, a huge weight
    with pytest.raises(ArtifactError, match=r"labels: rewards of expert 'a' on query 'q1' is not finite"):
        run_aggregate(store, EXPERTS, [ScoreSource("rm", "r1", 1e308)], "tagfp", [0], AggregateConfig(), 0.25)
    assert _files(tmp_path / "store") == before and not list((tmp_path / "w" / "store").glob("labels*"))


def test_check_finite_names_the_column_expert_and_query():
    labels = pl.DataFrame({"query_id": ["q1", "q2"], "rewards": [[1.0, 2.0], [1.0, 2.0]],
                           "soft": [[0.5, 0.5], [float("nan"), 0.5]], "target": [[0.5, 0.5], [0.5, 0.5]]})
    with pytest.raises(ArtifactError, match=r"soft of expert 'a' on query 'q2' is not finite"):
        check_finite(labels, EXPERTS)
    check_finite(labels.with_columns(pl.lit([0.5, 0.5]).alias("soft")), EXPERTS)  # all finite: no error
