"""embed: pooled encoder features of every query, one cell per shard, for routers with a frozen encoder.

With `router.freeze_encoder` the encoder never changes, so its features are computed once per (encoder,
pooling, max length, prefix) and shard, and reused by every training run, sweep point and evaluation: training
then only fits the small head, and evaluating a router on 10k queries is a matrix product. The encoder runs in
a Ray actor pool like any model (the stage runner, cluster/stage.py), sized like the router's training workers.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Protocol

import numpy as np
import polars as pl
import pyarrow as pa

from cluster import models
from cluster.backends import encoder_builder
from cluster.stage import Stage, StageResult, run_stage
from schemas.artifacts import EMBEDDINGS, QUERIES, embeddings_path, fingerprint, queries_path
from schemas.config import Resources, RouterConfig
from schemas.leases import Leases
from schemas.store import Store

CODE_VERSION = 1


class Encoder(Protocol):
    """The router's frozen encoder as the embed job sees it (cluster/backends.py `QueryEncoder`)."""

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), hidden) float32 pooled features."""
        ...


def embed_fingerprint(cfg: RouterConfig, identity: str | None = None) -> str:
    """The embedding cells' fingerprint; `identity`: the encoder's, as the run's plan resolved it (None: resolved
    here, for one-off calls)."""
    identity = identity or models.identity(cfg.encoder)
    return fingerprint({"encoder": identity, "pooling": cfg.pooling,
                        "max_length": cfg.max_length, "prefix": cfg.prefix, "code": CODE_VERSION})


def embed_cell(model: Encoder, shard: int, *, fp: str, encoder: str, store: Store) -> dict:
    """Embed one shard's queries and write its cell (the stage's job: runs inside the encoder's actor)."""
    t0 = time.perf_counter()
    q = store.read_table(queries_path(shard), QUERIES)
    vec = model.embed(q["text"].to_pylist())
    table = pa.table({"query_id": q["query_id"], "vector": pa.array(list(vec), pa.list_(pa.float32()))})
    seconds = time.perf_counter() - t0
    store.write_table(embeddings_path(fp, shard), table, EMBEDDINGS, {
        "stage": "embeddings", "fingerprint": fp, "shard": shard, "encoder": encoder, "seconds": round(seconds, 2)})
    return {"rows": table.num_rows, "seconds": seconds}


def embed_resources(cfg: RouterConfig) -> Resources:
    """The router's training workers' share of the cluster: one encoder per worker, its CPUs as torch threads."""
    return Resources(num_cpus=cfg.cpus_per_worker, num_gpus=1.0 if cfg.use_gpu else 0.0,
                     pool_size=max(1, cfg.num_workers), threads=max(1, int(cfg.cpus_per_worker)))


def run_embed(store: Store, cfg: RouterConfig, shards: list[int], leases: Leases | None = None,
              identity: str | None = None) -> StageResult:
    """Write the missing embedding cells (leased, like generation cells); the result's fingerprint names them.
    `identity`: the encoder's, from the run's plan (None: resolved here)."""
    identity = identity or models.identity(cfg.encoder)
    fp = embed_fingerprint(cfg, identity)
    res = embed_resources(cfg)
    return run_stage(store, Stage(
        step="embed", name=cfg.encoder, fingerprint=fp, schema=EMBEDDINGS, keys=shards,
        path=partial(embeddings_path, fp), job=partial(embed_cell, fp=fp, encoder=cfg.encoder, store=store),
        build=encoder_builder(cfg, identity, res.threads), resources=res, unit="shard"), leases)


def scan_embeddings(store: Store, embed_fp: str, shards: list[int]) -> pl.LazyFrame:
    return store.scan([embeddings_path(embed_fp, s) for s in shards])
