"""route: send new queries to experts with the store's champion router.

Reads JSONL, Parquet or CSV (by extension) in batches, so files larger than memory stream through; writes each
input record back with `expert` (the chosen expert's name) and `probs` (expert -> probability). The output is
written to a temporary file beside the target and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from cluster.router import Router
from schemas.artifacts import CHAMPION_PATH
from schemas.store import Store
from tasks.ingest import InputError

SUFFIXES = (".jsonl", ".parquet", ".csv")


def champion(store: Store) -> Router:
    if not store.exists(CHAMPION_PATH):
        raise InputError(f"{store.uri(CHAMPION_PATH)}: the store has no champion router; train one first")
    return Router.from_store(store, store.read_json(CHAMPION_PATH)["router"])


def _batches(path: Path, batch_size: int) -> Iterator[list[tuple[int, dict]]]:
    """(line or row number, record) batches."""
    if path.suffix == ".jsonl":
        batch = []
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise InputError(f"{path}:{n}: not a JSON line ({e})") from None
                if not isinstance(obj, dict):
                    raise InputError(f"{path}:{n}: each line must be a JSON object")
                batch.append((n, obj))
                if len(batch) == batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch
        return
    if path.suffix == ".parquet":
        reader, first = pq.ParquetFile(path).iter_batches(batch_size=batch_size), 1
    else:
        reader, first = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 20)), 2
    n = first
    for rb in reader:
        rows = rb.to_pylist()
        yield list(zip(range(n, n + len(rows)), rows, strict=True))
        n += len(rows)


def _writer(path: Path):
    """An append-only writer for the output type; returns (write(records), close())."""
    if path.suffix == ".jsonl":
        f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        return (lambda recs: f.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in recs),
                f.close)
    state: dict = {}

    def write(recs: list[dict]) -> None:
        if path.suffix == ".csv":  # CSV has no maps: probs as a JSON string
            recs = [r | {"probs": json.dumps(r["probs"])} for r in recs]
        table = pa.Table.from_pylist(recs)
        if "w" not in state:  # the first batch fixes the output schema; later batches are cast to it
            state["schema"] = table.schema
            state["w"] = pq.ParquetWriter(path, table.schema) if path.suffix == ".parquet" \
                else pacsv.CSVWriter(path, table.schema)
        state["w"].write_table(table.cast(state["schema"]))

    return write, lambda: state["w"].close() if "w" in state else None


def route_file(router: Router, src: str | Path, text_field: str, dst: str | Path, batch_size: int = 256) -> int:
    """Route every record of `src` into `dst`; returns the number of records routed."""
    src, dst = Path(src), Path(dst)
    for p in (src, dst):
        if p.suffix not in SUFFIXES:
            raise InputError(f"{p}: unsupported file type {p.suffix!r} (use {', '.join(SUFFIXES)})")
    if not src.is_file():
        raise InputError(f"{src}: input file not found")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=dst.suffix)
    os.close(fd)
    total = 0
    write, close = _writer(Path(tmp))
    try:
        with tqdm(desc=f"route {src.name}", unit="q") as bar:
            for batch in _batches(src, batch_size):
                texts = []
                for n, rec in batch:
                    text = rec.get(text_field)
                    if not isinstance(text, str) or not text.strip():
                        raise InputError(f"{src}:{n}: field {text_field!r} must be a non-empty string (--text-field)")
                    texts.append(text)
                probs = router.probs(texts)
                write([rec | {"expert": router.experts[int(p.argmax())],
                              "probs": dict(zip(router.experts, map(float, p), strict=True))}
                       for (_, rec), p in zip(batch, probs, strict=True)])
                total += len(batch)
                bar.update(len(batch))
        close()
        os.replace(tmp, dst)  # complete output or none
    except BaseException:
        close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return total
