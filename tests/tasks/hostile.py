"""Hostile text and record files for the property tests of ingest and route (hypothesis strategies, writers)."""

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import strategies as st

# zero-width, BOM, RTL override and mark, no-break space, line breaks, CSV and JSON specials
TRICKY = ["\u200b", "\u200d", "\u2060", "\ufeff", "\u202e", "\u200f", "\u00a0", " ", "\t", "\r\n", "\n", "\r", '"',
          ",", "\\"]
INVISIBLE = ["", " ", "\u200b", "\u200d\u2060", "\ufeff", "\t\r\n", "\u00a0\u3000"]  # no visible character
BAD = "@@BAD@@"  # written as an invalid UTF-8 byte

noise = st.lists(st.sampled_from(TRICKY) | st.text(st.characters(exclude_categories=("Cs",)), max_size=3),
                 max_size=3).map("".join)
visible_char = st.characters(exclude_categories=("Cs", "Cc", "Cf", "Co", "Cn", "Zs", "Zl", "Zp"))
texts = st.tuples(noise, visible_char, noise).map("".join)  # at least one visible character, tricks around it


def write_records(path: Path, records: list[dict], fields: list[str], draw_bool: Callable[[], bool]) -> list[int]:
    """Write `records` by `path`'s suffix, with random line ends, blank JSONL lines and a BOM; returns each record's
    location (physical line where it starts, or Parquet row). Lone surrogates are written as JSON escapes or raw."""
    if path.suffix == ".parquet":
        rows = [{k: r.get(k) for k in fields} for r in records]
        table = pa.Table.from_pylist(rows) if rows else pa.table({k: pa.array([], pa.string()) for k in fields})
        pq.write_table(table, path)
        return list(range(1, len(records) + 1))
    buf, lines = io.StringIO(), []
    if path.suffix == ".csv":
        crlf = draw_bool()  # with "\n" lines, only QUOTE_ALL quotes a field holding "\r" (Python's csv module)
        w = csv.writer(buf, lineterminator="\r\n" if crlf else "\n",
                       quoting=csv.QUOTE_MINIMAL if crlf else csv.QUOTE_ALL)
        w.writerow(fields)
        for r in records:
            lines.append(buf.getvalue().count("\n") + 1)
            w.writerow([r.get(k, "") for k in fields])
    else:
        eol = "\r\n" if draw_bool() else "\n"
        for r in records:
            if draw_bool():
                buf.write(eol)  # a blank line
            lines.append(buf.getvalue().count("\n") + 1)
            buf.write(json.dumps(r, ensure_ascii=draw_bool()) + eol)
    path.write_bytes(("\ufeff" if draw_bool() else "").encode() + buf.getvalue().encode("utf-8", "surrogatepass")
                     .replace(BAD.encode(), b"\xff"))
    return lines
