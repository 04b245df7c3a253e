"""embed: pooled encoder features of every query, one cell per shard, for routers with a frozen encoder.

With `router.freeze_encoder` the encoder never changes, so its features are computed once per (encoder,
pooling, max length, prefix) and shard, and reused by every training run, sweep point and evaluation: training
then only fits the small head, and evaluating a router on 10k queries is a matrix product.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import polars as pl
import pyarrow as pa
from tqdm.auto import tqdm

from cluster import models
from cluster.router import build, embed_texts
from schemas.artifacts import EMBEDDINGS, QUERIES, embeddings_path, fingerprint, queries_path
from schemas.config import RouterConfig
from schemas.store import Store, cell_todo, compute_once

CODE_VERSION = 1


def embed_fingerprint(cfg: RouterConfig) -> str:
    return fingerprint({"encoder": models.identity(cfg.encoder), "pooling": cfg.pooling,
                        "max_length": cfg.max_length, "prefix": cfg.prefix, "code": CODE_VERSION})


def run_embed(store: Store, cfg: RouterConfig, shards: list[int]) -> tuple[str, int]:
    """Write the missing embedding cells (leased, like generation cells); returns (fingerprint, cells computed)."""
    fp = embed_fingerprint(cfg)
    rel = lambda s: embeddings_path(fp, s)  # noqa: E731
    todo, _, _ = cell_todo(store, [(s, rel(s)) for s in shards], EMBEDDINGS, fp)

    def compute(keys: list[int], claim: Callable[[int], bool]) -> Iterator[int]:
        model = tok = None
        queries = {s: pl.from_arrow(store.read_table(queries_path(s), QUERIES).select(["query_id", "text"]))
                   for s in keys}
        with tqdm(total=sum(q.height for q in queries.values()), desc=f"embed {cfg.encoder}", unit="q") as bar:
            for s, q in queries.items():
                if not claim(s):  # another run embeds this shard
                    bar.update(q.height)
                    continue
                if model is None:  # built once something is ours to embed
                    model, tok = build(cfg.encoder, 1, cfg.pooling)
                t = time.perf_counter()
                vec = embed_texts(model, tok, q["text"].to_list(), cfg.max_length, cfg.prefix, progress=bar.update)
                table = pa.table({"query_id": q["query_id"].to_arrow(),
                                  "vector": pa.array(list(vec), pa.list_(pa.float32()))})
                store.write_table(rel(s), table, EMBEDDINGS,
                                  {"stage": "embeddings", "fingerprint": fp, "shard": s, "encoder": cfg.encoder,
                                   "seconds": round(time.perf_counter() - t, 2)})
                yield s

    computed, _ = compute_once(store, todo, rel, lambda s: store.valid_cell(rel(s), EMBEDDINGS, fp), compute)
    return fp, len(computed)


def scan_embeddings(store: Store, embed_fp: str, shards: list[int]) -> pl.LazyFrame:
    return store.scan([embeddings_path(embed_fp, s) for s in shards])
