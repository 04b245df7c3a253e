"""tag: give every query a set of tags T(q), one cell per shard.

The paper tags with an open-vocabulary LLM tagger (InsTag). A tagger here is anything with a `fingerprint`
and a `tag(queries) -> list[list[str]]`; `column` copies the tags that came with the input, `none` gives none
(then tag enhancement has nothing to average and s* = s). More taggers plug in through `TAGGERS`.
"""

from __future__ import annotations

from typing import Protocol

import polars as pl
import pyarrow as pa

from schemas.artifacts import QUERIES, TAGS, fingerprint, queries_path, tags_path
from schemas.config import TaggerConfig
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


def run_tag(store: Store, tagger: Tagger, shards: list[int]) -> int:
    """Write the missing tag cells; returns how many were computed."""
    done = 0
    for s in shards:
        rel = tags_path(tagger.fingerprint, s)
        if store.valid_cell(rel, TAGS, tagger.fingerprint):
            continue
        q = pl.from_arrow(store.read_table(queries_path(s), QUERIES))
        table = pa.table({"query_id": q["query_id"].to_arrow(),
                          "tags": pa.array(tagger.tag(q), pa.list_(pa.string()))})
        store.write_table(rel, table, TAGS, {"stage": "tags", "fingerprint": tagger.fingerprint, "shard": s})
        done += 1
    return done
