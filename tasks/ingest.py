"""ingest: read the query file, validate every row, give each query a stable id, append new queries as new shards.

Ids are kept as written: strings, or integers as their decimal digits (CSV cells are text, so `007` stays "007");
a float, boolean, list or object id is an error, and so is a text without a visible character. Existing shards
never change: a query already in the store keeps its shard, so every cell computed for that shard stays valid.
Bad input stops here, before anything is written, with the file and line in the message.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import polars as pl
import pyarrow as pa

from schemas.artifacts import QUERIES, queries_path, shard_index
from schemas.config import DataConfig
from schemas.errors import InputError
from schemas.store import Store
from tasks.records import check_file, is_text, records, schema, visible


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _as_tags(v: object, where: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if visible(v) else []
    if isinstance(v, list | tuple) and all(isinstance(t, str) for t in v):
        return [t for t in v if visible(t)]
    raise InputError(f"{where}: tags must be a string or a list of strings, got {type(v).__name__}")


def _as_written(v: object, where: str, field: str) -> str:
    """An id or reference as written: a string, or an integer as its decimal digits; anything else is an error
    (a float, boolean, list or object has no one way to be written)."""
    if isinstance(v, str) and visible(v):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    got = f"{v!r:.40}" if isinstance(v, str) else f"{type(v).__name__} {json.dumps(v, default=str):.40}"
    raise InputError(f"{where}: field {field!r} must be a string with a visible character or an integer, got {got}")


def _check_columns(path: Path, cfg: DataConfig) -> None:
    """A Parquet file's column types, before any row is read (CSV cells are all text; JSON is checked per line)."""
    fields = schema(path) if path.suffix == ".parquet" else None
    if fields is None:
        return
    rules = [(cfg.text_field, "data.text_field", "text", is_text),
             (cfg.id_field, "data.id_field", "text or integers", lambda t: is_text(t) or pa.types.is_integer(t)),
             (cfg.reference_field, "data.reference_field", "text or integers",
              lambda t: is_text(t) or pa.types.is_integer(t)),
             (cfg.tags_field, "data.tags_field", "text or lists of text",
              lambda t: is_text(t) or (pa.types.is_list(t) or pa.types.is_large_list(t)) and is_text(t.value_type))]
    for name, key, want, ok in rules:
        if name and name in fields.names and not (ok(t := fields.field(name).type) or pa.types.is_null(t)):
            raise InputError(f"{path}: column {name!r} is {t}; it must hold {want} ({key})")


def read_queries(cfg: DataConfig) -> pl.DataFrame:
    """Validate the input file (its first `data.limit` records) and return one row per distinct query (QUERIES
    columns). Ids, texts and references are kept exactly as written (see `tasks.records`)."""
    path = Path(cfg.path)
    check_file(path, "data file", " (data.path)")
    _check_columns(path, cfg)
    out: dict[str, dict] = {}
    for line, obj in islice(records(path), cfg.limit):
        where = f"{path}:{line}"
        text = obj.get(cfg.text_field)
        if text is None:
            raise InputError(f"{where}: missing field {cfg.text_field!r} (data.text_field)")
        if not isinstance(text, str) or not visible(text):
            raise InputError(f"{where}: field {cfg.text_field!r} must be a non-empty string with a visible "
                             f"character, got {text!r:.40}")
        qid = obj.get(cfg.id_field) if cfg.id_field else None
        if cfg.id_field and qid is None:
            raise InputError(f"{where}: missing field {cfg.id_field!r} (data.id_field)")
        qid = _as_written(qid, where, cfg.id_field) if cfg.id_field else text_id(text)
        ref = obj.get(cfg.reference_field) if cfg.reference_field else None  # "": none (an empty CSV cell)
        row = {"query_id": qid, "text": text, "source_line": line,
               "input_tags": _as_tags(obj.get(cfg.tags_field) if cfg.tags_field else None, where),
               "reference": None if ref is None or ref == "" else _as_written(ref, where, cfg.reference_field)}
        if qid in out:
            if out[qid]["text"] != text:
                raise InputError(f"{where}: id {qid!r} was used at line {out[qid]['source_line']} "
                                 "with a different text")
            continue
        out[qid] = row
    if not out:
        raise InputError(f"{path}: no queries")
    return pl.DataFrame(list(out.values()), schema={
        "query_id": pl.String, "text": pl.String, "source_line": pl.Int64,
        "input_tags": pl.List(pl.String), "reference": pl.String})


@dataclass(frozen=True)
class IngestResult:
    shards: list[int]  # every shard of the store
    new_shards: list[int]  # written by this call
    n_queries: int
    n_new: int


def check_stored_ids(queries: pl.DataFrame, known: pl.DataFrame, url: str, data_path: str | None = None) -> None:
    """A query id already in the store must keep its text (its cells were computed for that text)."""
    clash = queries.join(known, on="query_id", suffix="_stored").filter(pl.col("text") != pl.col("text_stored"))
    if clash.height:
        r = clash.sort("source_line").row(0, named=True)
        where = f"{data_path}:{r['source_line']}" if data_path else f"line {r['source_line']}"
        raise InputError(f"{where}: id {r['query_id']!r} is already in the store {url} with a different text")


def store_shards(store: Store) -> list[int]:
    return [shard_index(n) for n in store.ls("queries") if n.startswith("shard-") and n.endswith(".parquet")]


def write_shards(store: Store, queries: pl.DataFrame, shard_size: int) -> IngestResult:
    """Append queries that are not in the store yet as new shards. Each shard is created exclusively: when a
    concurrent run took a shard number first, re-plan against what is stored now (its queries are not re-added)."""
    for _ in range(100):
        try:
            return _append_shards(store, queries, shard_size)
        except FileExistsError:
            continue
    raise InputError(f"{store.url}: could not append query shards (other runs keep appending)")


def _append_shards(store: Store, queries: pl.DataFrame, shard_size: int) -> IngestResult:
    shards = store_shards(store)
    if shards:
        known = store.scan([queries_path(s) for s in shards]).select("query_id", "text").collect()
        check_stored_ids(queries, known, store.url)
        new = queries.join(known, on="query_id", how="anti")
        n_known = known.height
    else:
        new, n_known = queries, 0
    start = max(shards) + 1 if shards else 0
    new_shards = []
    for i, chunk in enumerate(new.iter_slices(shard_size)):
        s = start + i
        table = chunk.to_arrow()
        if "split" not in chunk.columns:  # null split: assigned later by a hash of the id
            table = table.append_column("split", pa.nulls(chunk.height, pa.string()))
        store.write_table(queries_path(s), table, QUERIES, {"stage": "queries", "shard": s}, exclusive=True)
        new_shards.append(s)
    return IngestResult(sorted(shards + new_shards), new_shards, n_known + new.height, new.height)
