"""Property tests of ingest: random records with random field sets, types and Unicode (zero-width, RTL, BOM,
CRLF, quoted newlines) written as JSONL, CSV or Parquet. Valid files give ids and texts exactly as written, in
the store too; a file with one defect fails with one line naming the defect's file:line and writes nothing."""

import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.artifacts import QUERIES, queries_path
from schemas.config import DataConfig
from schemas.errors import InputError
from schemas.store import Store
from tasks.ingest import read_queries, store_shards, write_shards
from tests.tasks.hostile import BAD, INVISIBLE, texts, write_records

extra_values = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts \
    | st.lists(texts, max_size=2)


def as_written(v) -> str:
    return v if isinstance(v, str) else str(v)


@st.composite
def datasets(draw):
    """(format, records, extra column names): ids unique as written, every record a text."""
    fmt = draw(st.sampled_from([".jsonl", ".csv", ".parquet"]))
    id_kind = draw(st.sampled_from([str, int]))  # Parquet: one column type
    ids = draw(st.lists(texts if id_kind is str else st.integers(-2**63, 2**63 - 1), min_size=1, max_size=6,
                        unique_by=as_written))
    extras = draw(st.lists(st.sampled_from(["note", "score", "ünï", "\u202eltr", "a b"]), unique=True, max_size=3))
    records = []
    for qid in ids:
        rec = {"id": qid if fmt != ".csv" else as_written(qid), "text": draw(texts)}
        for name in extras:
            if fmt == ".jsonl" and draw(st.booleans()):  # JSON lines each carry their own fields
                continue
            rec[name] = draw(texts if fmt != ".jsonl" else extra_values)
        records.append(rec)
    return fmt, records


def write(path: Path, records: list[dict], draw_bool) -> list[int]:
    return write_records(path, records, list(dict.fromkeys(k for r in records for k in r)), draw_bool)


def ingest(path: Path, store: Store):
    df = read_queries(DataConfig(path=str(path), id_field="id"))
    write_shards(store, df, 4)
    return df


@settings(max_examples=50, deadline=None)
@given(data=datasets(), draw=st.data())
def test_valid_files_keep_ids_and_texts_as_written(data, draw):
    fmt, records = data
    with tempfile.TemporaryDirectory() as tmp:
        path, store = Path(tmp) / f"q{fmt}", Store(str(Path(tmp) / "store"))
        lines = write(path, records, lambda: draw.draw(st.booleans()))
        df = ingest(path, store)
        want = [(as_written(r["id"]), r["text"]) for r in records]
        assert list(zip(df["query_id"], df["text"], strict=True)) == want
        assert df["source_line"].to_list() == lines
        stored = pa.concat_tables([store.read_table(queries_path(s), QUERIES) for s in sorted(store_shards(store))])
        assert list(zip(stored["query_id"].to_pylist(), stored["text"].to_pylist(), strict=True)) == want


DEFECTS = {  # name -> (formats, change to the record)
    "invisible text": ((".jsonl", ".csv", ".parquet"), lambda r, d: r | {"text": d(st.sampled_from(INVISIBLE))}),
    "missing text": ((".jsonl",), lambda r, d: {k: v for k, v in r.items() if k != "text"}),
    "text not a string": ((".jsonl",), lambda r, d: r | {"text": d(st.integers() | st.lists(texts, max_size=1))}),
    "lone surrogate": ((".jsonl",), lambda r, d: r | {"text": r["text"] + d(st.sampled_from(["\ud800", "\udfff"]))}),
    "invalid UTF-8": ((".jsonl", ".csv"), lambda r, d: r | {"text": r["text"] + BAD}),
    "id of another type": ((".jsonl",), lambda r, d: r | {
        "id": d(st.floats(allow_nan=False, allow_infinity=False) | st.booleans() | st.lists(st.integers(), max_size=1)
                | st.dictionaries(texts, st.integers(), max_size=1))}),
    "invisible id": ((".jsonl", ".csv"), lambda r, d: r | {"id": d(st.sampled_from(INVISIBLE))}),
    "tags of another type": ((".jsonl",), lambda r, d: r | {"tags": d(st.integers() | st.dictionaries(texts, texts))}),
}


@settings(max_examples=50, deadline=None)
@given(data=datasets(), defect=st.sampled_from(sorted(DEFECTS)), draw=st.data())
def test_one_defect_is_one_line_naming_its_location_and_nothing_is_written(data, defect, draw):
    fmt, records = data
    formats, change = DEFECTS[defect]
    fmt = fmt if fmt in formats else formats[0]
    if fmt == ".csv":
        records = [{k: as_written(v) for k, v in r.items()} for r in records]
    k = draw.draw(st.integers(0, len(records) - 1))
    records[k] = change(records[k], draw.draw)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"q{fmt}"
        lines = write(path, records, lambda: draw.draw(st.booleans()))
        with pytest.raises(InputError) as err:
            df = read_queries(DataConfig(path=str(path), id_field="id", tags_field="tags"))
            write_shards(Store(str(Path(tmp) / "store")), df, 4)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{path}:{lines[k]}: "), (defect, message)
        assert not (Path(tmp) / "store").exists()
