"""embed: the encoder the embed stage's actors load, its cells, and the stage through a real Ray pool."""

import numpy as np
import pyarrow as pa
import pytest

from cluster import models
from cluster.backends import QueryEncoder, encoder_builder
from schemas.artifacts import EMBEDDINGS, QUERIES, SCHEMA_VERSION, embeddings_path, queries_path
from schemas.config import RouterConfig
from schemas.store import Store
from tasks.embed import embed_cell, embed_fingerprint, embed_resources, run_embed

CFG = RouterConfig(encoder="packaged:all-minilm-l6-v2", freeze_encoder=True, max_length=32, prefix="query: ")


def _store(tmp_path, shards=2) -> Store:
    s = Store(str(tmp_path / "store"))
    for shard in range(shards):
        ids = [f"{shard}-{i}" for i in range(3)]
        s.write_table(queries_path(shard), pa.table({
            "query_id": ids, "text": [f"question {i} of shard {shard}" for i in range(3)], "input_tags": [[]] * 3,
            "reference": [None] * 3, "split": [None] * 3, "source_line": [1, 2, 3]}), QUERIES)
    return s


class FakeEncoder:
    def embed(self, texts: list[str]) -> np.ndarray:
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)


def test_embed_cell_writes_one_vector_per_query_in_shard_order(tmp_path):
    s = _store(tmp_path)
    out = embed_cell(FakeEncoder(), 1, fp="fp", encoder="enc", store=s)
    assert out["rows"] == 3 and out["seconds"] >= 0
    t = s.read_table(embeddings_path("fp", 1), EMBEDDINGS)
    assert t["query_id"].to_pylist() == ["1-0", "1-1", "1-2"]
    assert t["vector"].to_pylist()[0] == [len("question 0 of shard 1"), 1.0]
    meta = s.read_meta(embeddings_path("fp", 1))
    assert {k: meta[k] for k in ("schema_version", "stage", "fingerprint", "shard", "encoder")} == {
        "schema_version": SCHEMA_VERSION, "stage": "embeddings", "fingerprint": "fp", "shard": 1, "encoder": "enc"}


def test_query_encoder_matches_the_routers_own_features():
    from cluster.router import build, embed_texts

    enc = encoder_builder(CFG, models.identity(CFG.encoder))()
    assert isinstance(enc, QueryEncoder)
    texts = ["What is 2 + 3?", "Write a line about rain, please."]
    model, tok = build(CFG.encoder, 1, CFG.pooling)
    want = embed_texts(model, tok, texts, CFG.max_length, CFG.prefix)
    assert enc.embed(texts) == pytest.approx(want, abs=1e-5)


def test_fingerprint_and_resources():
    fp = embed_fingerprint(CFG)
    assert fp == embed_fingerprint(CFG.model_copy(update={"epochs": 9, "num_workers": 3, "head_hidden": 8}))
    assert fp != embed_fingerprint(CFG.model_copy(update={"prefix": ""}))
    res = embed_resources(CFG.model_copy(update={"num_workers": 2, "cpus_per_worker": 2.0, "use_gpu": True}))
    assert (res.pool_size, res.num_cpus, res.threads, res.num_gpus) == (2, 2.0, 2, 1.0)


@pytest.mark.slow
def test_run_embed_runs_in_an_actor_and_reuses_its_cells(tmp_path, ray_session):
    s = _store(tmp_path)
    first = run_embed(s, CFG, [0, 1])
    assert (first.computed, first.rows, first.fingerprint) == ([0, 1], 6, embed_fingerprint(CFG))
    assert first.nodes == [ray_session.get_runtime_context().get_node_id()]  # it ran in an actor, not here
    assert all(s.valid_cell(embeddings_path(first.fingerprint, k), EMBEDDINGS, first.fingerprint) for k in (0, 1))
    again = run_embed(s, CFG, [0, 1])
    assert (again.computed, again.skipped, again.nodes) == ([], [0, 1], [])
