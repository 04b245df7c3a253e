"""tag: give every query a set of tags T(q), one cell per shard.

The paper tags with an open-vocabulary LLM tagger (InsTag). A tagger here is anything with a `fingerprint`
and a `tag(queries) -> list[list[str]]`; `column` copies the tags that came with the input, `none` gives none
(then tag enhancement has nothing to average and s* = s). More taggers plug in through `TAGGERS`.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Protocol

import polars as pl
import pyarrow as pa

from cluster.stage import Stage, StageResult, run_stage
from schemas.artifacts import QUERIES, TAGS, fingerprint, queries_path, tags_path
from schemas.config import TaggerConfig
from schemas.leases import Leases
from schemas.store import Store


class Tagger(Protocol):
    fingerprint: str

    def tag(self, queries: pl.DataFrame) -> list[list[str]]: ...


class ColumnTagger:
    def __init__(self) -> None:
        self.fingerprint = "column-" + fingerprint({"tagger": "column", "v": 1}, 8)

    def tag(self, queries: pl.DataFrame) -> list[list[str]]:
        return queries["input_tags"].to_list()


class NoTagger:
    def __init__(self) -> None:
        self.fingerprint = "none-" + fingerprint({"tagger": "none", "v": 1}, 8)

    def tag(self, queries: pl.DataFrame) -> list[list[str]]:
        return [[] for _ in range(queries.height)]


TAGGERS: dict[str, type] = {"column": ColumnTagger, "none": NoTagger}


def make_tagger(cfg: TaggerConfig) -> Tagger:
    return TAGGERS[cfg.kind]()


def tag_cell(model: None, shard: int, *, tagger: Tagger, store: Store) -> dict:
    """Tag one shard's queries and write its cell (the stage's job; taggers run in-process, without a model)."""
    t0 = time.perf_counter()
    q = pl.from_arrow(store.read_table(queries_path(shard), QUERIES))
    table = pa.table({"query_id": q["query_id"].to_arrow(), "tags": pa.array(tagger.tag(q), pa.list_(pa.string()))})
    store.write_table(tags_path(tagger.fingerprint, shard), table, TAGS,
                      {"stage": "tags", "fingerprint": tagger.fingerprint, "shard": shard})
    return {"rows": table.num_rows, "seconds": time.perf_counter() - t0}


def run_tag(store: Store, tagger: Tagger, shards: list[int], leases: Leases | None = None) -> StageResult:
    """Write the missing tag cells."""
    return run_stage(store, Stage(
        step="tag", name=type(tagger).__name__, fingerprint=tagger.fingerprint, schema=TAGS, keys=shards,
        path=partial(tags_path, tagger.fingerprint), job=partial(tag_cell, tagger=tagger, store=store),
        unit="shard"), leases)
