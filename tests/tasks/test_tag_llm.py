"""tag, kind llm (InsTag-style): parsing and normalising the tagger's JSON, merging, rare tags, parse failures."""

import polars as pl
import pyarrow as pa
import pytest

from cluster.batches import Generation
from schemas.artifacts import QUERIES, TAGS, queries_path, tags_path
from schemas.config import ExpertSpec, FlowConfig, TaggerConfig
from schemas.errors import ConfigError
from schemas.store import Store
from tasks.tag import PREFILL, LLMTagger, frequent_tags, llm_tag_cell, make_tagger, normalise_tag, parse_tags, run_tag


@pytest.mark.parametrize(("text", "want"), [
    ('["Math", "word_problem"]', ["math", "word problem"]),
    ('["Math", "math.", " MATH "', ["math"]),  # variants merge; cut off before "]" (the stop string)
    ('["code gen', ["code gen"]),  # cut inside a string
    ('[{"tag": "Code-Gen", "explanation": "..."}]', ["code gen"]),  # InsTag's own format
    ('{"tags": ["a", "b", "c", "d"]}', ["a", "b", "c"]),  # at most max_tags
    ('Sure! Tags: ["poetry"] hope this helps', ["poetry"]),
    ('["", "!!", 3, "x"]', ["x"]),  # empty and non-string items tag nothing
    ('["数学", "Ünïcode"]', ["数学", "ünïcode"]),
])
def test_parse_tags_normalises_and_merges(text, want):
    assert parse_tags(text, 3) == want


@pytest.mark.parametrize("text", ["", "math, algebra", "{not json", '{"label": "x"}', "[]", '["I think this is code"]'])
def test_unreadable_answers_are_none(text):
    assert parse_tags(text, 3) is None


def test_normalise_tag():
    assert normalise_tag("  Word-Problem!!  (easy)") == "word problem easy"


class FakeTagger:
    """An expert as the tag job sees it: answers are looked up by query text; renders like a chat template."""

    def __init__(self, answers: dict[str, str]):
        self.answers, self.prompts = answers, []

    def render(self, query: str) -> str:
        return f"<user>{query}</user>"

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, stop, batch_size):
        self.prompts += prompts
        return [Generation(next(a for q, a in self.answers.items() if q in p), 5, 3, "stop") for p in prompts]


TEXTS = {"a": "What is 2+2?", "b": "Add 3 and 4.", "c": "Write a haiku.", "d": "Sort a list.", "e": "What is 9-1?"}
ANSWERS = {  # the model's continuation after the prefill '["' (the stop string "]" is cut off)
    "What is 2+2?": 'Math", "Arithmetic"', "Add 3 and 4.": 'math", "addition"', "Write a haiku.": 'poetry"',
    "Sort a list.": "I think this is code", "What is 9-1?": 'MATH!", "arithmetic"'}


def _store(tmp_path) -> Store:
    s = Store(str(tmp_path / "store"))
    for shard, ids in enumerate((["a", "b", "c"], ["d", "e"])):
        s.write_table(queries_path(shard), pa.table({
            "query_id": ids, "text": [TEXTS[i] for i in ids], "input_tags": [[]] * len(ids),
            "reference": [None] * len(ids), "split": ["train", "train", "test"][:len(ids)],
            "source_line": list(range(1, len(ids) + 1))}), QUERIES)
    return s


def _flow(tmp_path, **tagger) -> FlowConfig:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")  # an identity without weights: nothing loads here
    expert = {"name": "judge", "model": str(tmp_path / "model"), "sampling": {"max_new_tokens": 8}}
    return FlowConfig(store={"url": str(tmp_path / "store")}, data={"path": "q.jsonl"}, experts=[expert],
                      reward_models=[{"name": "exact", "kind": "verifiable"}],
                      tagger={"kind": "llm", "expert": "judge", **tagger})


def test_tag_job_writes_raw_tags_and_counts_parse_failures(tmp_path):
    s = _store(tmp_path)
    model = FakeTagger(ANSWERS)
    out = llm_tag_cell(model, 1, spec=ExpertSpec(name="judge", model=str(tmp_path)), cfg=TaggerConfig(
        kind="llm", expert="judge"), template="Tags for: {query} (max {max_tags})", fp="raw", store=s)
    assert out["rows"] == 2 and out["flags"] == {"parse_failure": 1}
    assert model.prompts == [f"<user>Tags for: {TEXTS['d']} (max 3)</user>{PREFILL}",
                             f"<user>Tags for: {TEXTS['e']} (max 3)</user>{PREFILL}"]
    t = pl.from_arrow(s.read_table(tags_path("raw", 1), TAGS))
    assert t.to_dicts() == [{"query_id": "d", "tags": []}, {"query_id": "e", "tags": ["math", "arithmetic"]}]
    assert s.read_meta(tags_path("raw", 1))["flags"] == {"parse_failure": 1}


def test_rare_tags_are_dropped_by_training_counts():
    raw = pl.DataFrame({"query_id": ["a", "b", "c", "d"], "split": ["train", "train", "train", "test"],
                        "tags": [["math", "x"], ["math"], ["x", "x"], ["x", "y"]]})
    # "x" twice on query c counts once; the test query's tags count for nothing
    assert frequent_tags(raw, 2) == {"math", "x"}
    assert frequent_tags(raw, 3) == set()


def test_llm_tagger_merges_keeps_frequent_tags_and_reports_failures(tmp_path):
    s = _store(tmp_path)
    cfg = _flow(tmp_path)
    tagger = make_tagger(cfg.tagger, cfg)
    assert isinstance(tagger, LLMTagger)
    for shard in (0, 1):  # the expert's raw cells, as its actor would write them (so no model loads here)
        llm_tag_cell(FakeTagger(ANSWERS), shard, spec=tagger.expert, cfg=tagger.cfg, template=tagger.template,
                     fp=tagger.raw_fp, store=s)
    res = run_tag(s, tagger, [0, 1])
    assert res.flags == {"parse_failure": 1} and tagger.fingerprint.startswith("llm-")
    tags = {r["query_id"]: r["tags"] for k in (0, 1) for r in s.read_table(tags_path(tagger.fingerprint, k),
                                                                          TAGS).to_pylist()}
    # training queries a, b, d(unparsed), e: "math" x3, "arithmetic" x2 stay; "addition" (once) and the test
    # query c's "poetry" go
    assert tags == {"a": ["math", "arithmetic"], "b": ["math"], "c": [], "d": [], "e": ["math", "arithmetic"]}
    meta = s.read_meta(tags_path(tagger.fingerprint, 1))
    assert (meta["source"], meta["flags"], meta["vocabulary"]) == (tagger.raw_fp, {"parse_failure": 1}, 2)
    stricter = make_tagger(cfg.tagger.model_copy(update={"min_count": 3}), cfg)
    run_tag(s, stricter, [0, 1])
    assert stricter.raw_fp == tagger.raw_fp and stricter.fingerprint != tagger.fingerprint  # same model answers
    assert s.read_table(tags_path(stricter.fingerprint, 0), TAGS)["tags"].to_pylist() == [["math"], ["math"], []]


def test_llm_tagger_config_errors(tmp_path):
    with pytest.raises(ValueError, match="tagger.expert"):
        TaggerConfig(kind="llm")
    cfg = _flow(tmp_path, expert="nobody")
    with pytest.raises(ConfigError, match="tagger.expert: 'nobody'"):
        make_tagger(cfg.tagger, cfg)


@pytest.mark.slow
def test_llm_tagger_runs_in_the_experts_actor_pool(tmp_path, tiny_models, ray_session):
    """A tiny random LM answers nonsense: every answer is a parse failure, counted, and the run still tags."""
    s = _store(tmp_path)
    cfg = _flow(tmp_path).model_copy(update={"experts": [ExpertSpec(
        name="judge", model=str(tiny_models["lm_a"]), dtype="float32", resources={"num_cpus": 1, "batch_size": 4})]})
    tagger = make_tagger(cfg.tagger.model_copy(update={"max_new_tokens": 4}), cfg)
    res = run_tag(s, tagger, [0, 1])
    assert res.computed == [0, 1] and res.rows == 5
    raw = [s.read_meta(tags_path(tagger.raw_fp, k)) for k in (0, 1)]
    assert all(m["expert"] == "judge" for m in raw)
    failures = sum(m["flags"]["parse_failure"] for m in raw)
    assert res.flags == {"parse_failure": failures} and 0 <= failures <= 5
    assert sum(s.read_meta(tags_path(tagger.fingerprint, k))["flags"]["parse_failure"] for k in (0, 1)) == failures
