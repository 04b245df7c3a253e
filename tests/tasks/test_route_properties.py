"""Property tests of route_file: random records with random field sets, types and Unicode (zero-width, RTL, BOM,
CRLF, quoted newlines) in JSONL, CSV or Parquet, routed to any of the three. Valid input comes back record for
record with only `expert` and `probs` added; input with one defect fails with one line naming its location before
the router runs, and the existing output file stays byte for byte."""

import csv
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.errors import InputError
from tasks.route import route_file
from tests.tasks.hostile import BAD, INVISIBLE, noise, texts, write_records

FORMATS = [".jsonl", ".csv", ".parquet"]

VALUES = {"str": texts | noise, "int": st.integers(-2**63, 2**63 - 1),
          "float": st.floats(allow_nan=False, allow_infinity=False), "bool": st.booleans(),
          "list": st.lists(texts, max_size=2)}


class Router:
    experts = ["left", "right"]

    def __init__(self):
        self.calls = 0

    def probs(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        return np.array([[0.25, 0.75] if len(t) % 2 else [0.6, 0.4] for t in texts])


def added(rec: dict) -> dict:
    p = [0.25, 0.75] if len(rec["q"]) % 2 else [0.6, 0.4]
    return {"expert": Router.experts[int(np.argmax(p))], "probs": dict(zip(Router.experts, p, strict=True))}


@st.composite
def inputs(draw):
    """(input format, records as they will be read back, union of fields in order)."""
    fmt = draw(st.sampled_from(FORMATS))
    types = draw(st.dictionaries(st.sampled_from(["id", "note", "ünï", "\u202ertl", "a b", "tags"]),
                                 st.sampled_from(sorted(VALUES)), max_size=4))
    if fmt == ".csv":
        types = dict.fromkeys(types, "str")  # CSV cells are text
    records = []
    for _ in range(draw(st.integers(0, 6))):
        rec = {"q": draw(texts)}
        for name, kind in types.items():
            if fmt == ".jsonl" and draw(st.booleans()):  # JSON lines each carry their own fields
                continue
            rec[name] = draw(st.none() | VALUES[kind]) if fmt != ".csv" else draw(VALUES[kind])
        records.append(rec)
    return fmt, records, ["q", *types]


def cell(v) -> str:
    """A CSV output cell: text as is, null empty, anything else as JSON."""
    return "" if v is None else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def read_back(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(ln) for ln in path.read_bytes().decode().split("\n") if ln]
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return [r | {"probs": json.loads(r["probs"])} for r in csv.DictReader(f)]
    return pq.read_table(path).to_pylist()


@settings(max_examples=50, deadline=None)
@given(data=inputs(), dst_ext=st.sampled_from(FORMATS), batch_size=st.integers(1, 4), draw=st.data())
def test_valid_records_come_back_exactly_with_expert_and_probs(data, dst_ext, batch_size, draw):
    fmt, records, fields = data
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / f"in{fmt}", Path(tmp) / f"out{dst_ext}"
        write_records(src, records, fields, lambda: draw.draw(st.booleans()))
        dst.write_bytes(b"replaced")
        assert route_file(Router(), src, "q", dst, batch_size=batch_size) == len(records)
        if fmt == ".jsonl":
            fields = list(dict.fromkeys(k for r in records for k in r))  # the union of what the lines carry
        if fmt != ".jsonl" or dst_ext != ".jsonl":  # a table: every record has every field
            records = [{k: r.get(k, "" if fmt == ".csv" else None) for k in fields} for r in records]
        if dst_ext == ".csv":
            records = [{k: cell(v) for k, v in r.items()} for r in records]
        assert read_back(dst) == [r | added(r) for r in records]
        assert sorted(p.name for p in Path(tmp).iterdir()) == sorted([src.name, dst.name])


def _conflict(records: list[dict], k: int) -> list[dict]:
    """Field `v` an integer on the first record, text on record k (k > 0)."""
    records[0]["v"], records[k]["v"] = 1, "one"
    return records


DEFECTS = {  # name -> (input formats, output formats, change(records, k, draw), located at record k)
    "invisible text": (FORMATS, FORMATS, lambda rs, k, d: rs[k].update(q=d(st.sampled_from(INVISIBLE))), True),
    "missing text": ([".jsonl"], FORMATS, lambda rs, k, d: rs[k].pop("q"), True),
    "null text": ([".parquet"], FORMATS, lambda rs, k, d: rs[k].update(q=None), True),
    "text not a string": ([".jsonl"], FORMATS, lambda rs, k, d: rs[k].update(q=d(st.integers() | VALUES["list"])),
                          True),
    "lone surrogate": ([".jsonl"], FORMATS, lambda rs, k, d: rs[k].update(
        {d(st.sampled_from(sorted(rs[k]))): d(st.sampled_from(["a\ud800", "\udfff"]))}), True),
    "invalid UTF-8": ([".jsonl", ".csv"], FORMATS, lambda rs, k, d: rs[k].update(q=rs[k]["q"] + BAD), True),
    "an expert field": ([".jsonl"], FORMATS, lambda rs, k, d: rs[k].update(expert="mine"), True),
    "an expert column": ([".csv", ".parquet"], FORMATS, lambda rs, k, d: rs[k].update(probs="mine"), False),
    "mixed types for Parquet": ([".jsonl"], [".parquet"], lambda rs, k, d: _conflict(rs, k), True),
}


@settings(max_examples=50, deadline=None)
@given(data=inputs(), defect=st.sampled_from(sorted(DEFECTS)), draw=st.data())
def test_one_defect_is_one_line_naming_its_location_and_the_output_stays(data, defect, draw):
    fmt, records, fields = data
    formats, outputs, change, at_record = DEFECTS[defect]
    fmt = fmt if fmt in formats else formats[0]
    records = records or [{"q": "a query"}]
    if defect.startswith("mixed") and len(records) == 1:
        records.append({"q": "another query"})
    k = draw.draw(st.integers(1 if defect.startswith("mixed") else 0, len(records) - 1))
    change(records, k, draw.draw)
    fields = list(dict.fromkeys([*fields, *(f for r in records for f in r)]))
    if fmt == ".csv":
        records = [{f: v if isinstance(v, str) else json.dumps(v) for f, v in r.items()} for r in records]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / f"in{fmt}", Path(tmp) / f"out{draw.draw(st.sampled_from(outputs))}"
        lines = write_records(src, records, fields, lambda: draw.draw(st.booleans()))
        dst.write_bytes(b"precious")
        router = Router()
        with pytest.raises(InputError) as err:
            route_file(router, src, "q", dst, batch_size=draw.draw(st.integers(1, 4)))
        message = str(err.value)
        where = f"{src}:{lines[k]}: " if at_record else f"{src}: "
        assert "\n" not in message and message.startswith(where), (defect, message)
        assert router.calls == 0 and dst.read_bytes() == b"precious"
        assert sorted(p.name for p in Path(tmp).iterdir()) == sorted([src.name, dst.name])
