"""ingest: read the query file, validate every row, give each query a stable id, append new queries as new shards.

Existing shards never change: a query already in the store keeps its shard, so every cell computed for that shard
stays valid. Bad input stops here, before anything is written, with the file and line in the message.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa

from schemas.artifacts import QUERIES, queries_path, shard_index
from schemas.config import ConfigError, DataConfig
from schemas.store import Store


class InputError(ConfigError):
    """Bad input data; the message names the file and line."""


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _as_tags(v: object, where: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v.strip() else []
    if isinstance(v, list | tuple) and all(isinstance(t, str) for t in v):
        return [t for t in v if t.strip()]
    raise InputError(f"{where}: tags must be a string or a list of strings, got {type(v).__name__}")


def _rows_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: malformed JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{n}: each line must be a JSON object")
            rows.append((n, obj))
    return rows


def _rows_table(path: Path) -> list[tuple[int, dict]]:
    try:
        df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
    except Exception as e:  # noqa: BLE001 - polars raises many types; the message is what matters
        raise InputError(f"{path}: unreadable {path.suffix[1:]} file ({str(e).splitlines()[0]})") from None
    first = 2 if path.suffix == ".csv" else 1  # csv line 1 is the header
    return [(first + i, row) for i, row in enumerate(df.iter_rows(named=True))]


def read_queries(cfg: DataConfig) -> pl.DataFrame:
    """Validate the whole input file and return one row per distinct query (QUERIES columns)."""
    path = Path(cfg.path)
    if not path.is_file():
        raise InputError(f"{path}: data file not found (data.path)")
    if path.suffix == ".jsonl":
        rows = _rows_jsonl(path)
    elif path.suffix in (".parquet", ".csv"):
        rows = _rows_table(path)
    else:
        raise InputError(f"{path}: unsupported data file type {path.suffix!r} (use .jsonl, .parquet or .csv)")
    if cfg.limit:
        rows = rows[: cfg.limit]
    out: dict[str, dict] = {}
    for line, obj in rows:
        where = f"{path}:{line}"
        text = obj.get(cfg.text_field)
        if text is None:
            raise InputError(f"{where}: missing field {cfg.text_field!r} (data.text_field)")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: field {cfg.text_field!r} must be a non-empty string")
        qid = obj.get(cfg.id_field) if cfg.id_field else None
        if cfg.id_field and qid is None:
            raise InputError(f"{where}: missing field {cfg.id_field!r} (data.id_field)")
        qid = str(qid) if qid is not None else text_id(text)
        ref = obj.get(cfg.reference_field) if cfg.reference_field else None
        row = {"query_id": qid, "text": text, "source_line": line,
               "input_tags": _as_tags(obj.get(cfg.tags_field) if cfg.tags_field else None, where),
               "reference": None if ref is None else str(ref)}
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
