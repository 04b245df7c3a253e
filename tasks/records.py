"""records: a user's record file (JSONL, CSV or Parquet) read exactly as written, in batches, with locations.

Ingest and route both read through here, so they accept the same files and report the same file:line. Nothing is
guessed: CSV cells are text as written (`007` stays "007"), JSON values keep their JSON types, Parquet values their
column types. Rejected, naming the location: invalid UTF-8, lone surrogates (`"\\ud800"`), a key twice in one JSON
object, NaN/Infinity and out-of-range numbers (not JSON), bad CSV quoting, a CSV row whose field count differs
from the header's, a name twice in the CSV header. A UTF-8 byte order mark at the start of a file is skipped.
Locations are physical lines (JSONL, CSV: the line where the record starts; the CSV header is line 1, unless blank
lines come first) or 1-based row numbers (Parquet).
"""

from __future__ import annotations

import csv
import json
import math
import re
import stat
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.errors import InputError

SUFFIXES = (".jsonl", ".csv", ".parquet")
Record = tuple[int, dict]  # (line or row number, record)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape that can decode to a surrogate


def visible(text: str) -> bool:
    """Whether `text` has a character one can see (not only whitespace, control or zero-width characters)."""
    return any(not unicodedata.category(c).startswith(("C", "Z")) for c in text)


def is_text(t: pa.DataType) -> bool:
    """A Parquet/Arrow string type (plain, large, view, or dictionary-encoded)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def check_file(path: Path, what: str, hint: str = "") -> None:
    """A readable regular file with a supported suffix; `what` names it in the message, `hint` says where it is set."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found{hint}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the {what} ({e.strerror}){hint}") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
        raise InputError(f"{path}: {what} is {kind}, not a regular file{hint}")
    check_suffix(path, what, hint)


def check_suffix(path: Path, what: str, hint: str = "") -> None:
    if path.suffix not in SUFFIXES:
        raise InputError(f"{path}: unsupported {what} type {path.suffix!r} (use {', '.join(SUFFIXES)}){hint}")


def schema(path: Path) -> pa.Schema | None:
    """The fields every record has: Parquet's schema, the CSV header (all text); None for JSONL (they vary)."""
    if path.suffix == ".parquet":
        try:
            return pq.read_schema(path).remove_metadata()
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{path}: unreadable Parquet file ({_first_line(e)})") from None
    if path.suffix == ".csv":
        rows = _csv_rows(path)
        header = next((row for _, row in rows), [])
        rows.close()
        return pa.schema([(name, pa.string()) for name in header])
    return None


def records(path: Path, batch_size: int = 1024) -> Iterator[Record]:
    """The file's records one by one (Parquet is read `batch_size` rows at a time)."""
    return _parquet(path, batch_size) if path.suffix == ".parquet" else _csv(path) if path.suffix == ".csv" \
        else _jsonl(path)


def batches(path: Path, batch_size: int) -> Iterator[list[Record]]:
    """The file's records in lists of at most `batch_size`; streams, so files larger than memory pass."""
    batch: list[Record] = []
    for rec in records(path, batch_size):
        batch.append(rec)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")  # noqa: SIM115 - the callers close it
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None


def _decode(raw: bytes, path: Path, n: int, where: int | None = None) -> str:
    """Physical line n as text; an error names line `where` (default n: a CSV record names where it starts)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}:{where or n}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return line.removeprefix("\ufeff") if n == 1 else line


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text} is out of range")
    return x


def _object(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup!r} appears twice in one object")
    return obj


def _jsonl(path: Path) -> Iterator[Record]:
    with _open(path) as f:
        for n, raw in enumerate(f, 1):
            line = _decode(raw, path, n)
            if not line.strip():
                continue
            try:
                obj = json.loads(line, object_pairs_hook=_object, parse_constant=_no_constant, parse_float=_finite)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: malformed JSON ({e.msg}, column {e.colno})") from None
            except ValueError as e:  # our hooks, and ints too long to convert
                raise InputError(f"{path}:{n}: malformed JSON ({e})") from None
            except RecursionError:
                raise InputError(f"{path}:{n}: malformed JSON (nested too deeply)") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{n}: each line must be a JSON object")
            if _SURROGATE_ESCAPE.search(line):  # only a \u escape can put a lone surrogate into a decoded line
                try:
                    json.dumps(obj, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError as e:
                    raise InputError(f"{path}:{n}: invalid Unicode (lone surrogate \\u{ord(e.object[e.start]):04x} "
                                     "in a JSON string)") from None
            yield n, obj


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(physical line where the row starts, cells as text); blank lines skipped."""
    with _open(path) as f:
        start = 1  # read lazily by the generator below: errors name the line where the current record starts
        reader = csv.reader((_decode(raw, path, n, start) for n, raw in enumerate(f, 1)), strict=True)
        while True:
            try:
                row = next(reader, None)
            except csv.Error as e:
                raise InputError(f"{path}:{start}: malformed CSV ({e})") from None
            if row is None:
                return
            n, start = start, reader.line_num + 1
            if row:
                yield n, row


def _csv(path: Path) -> Iterator[Record]:
    rows = _csv_rows(path)
    first = next(rows, None)
    if first is None:
        return
    line, header = first
    dup = next((name for i, name in enumerate(header) if name in header[:i]), None)
    if dup is not None:
        raise InputError(f"{path}:{line}: column {dup!r} appears twice in the header")
    for n, row in rows:
        if len(row) != len(header):
            raise InputError(f"{path}:{n}: {len(row)} fields where the header has {len(header)}")
        yield n, dict(zip(header, row, strict=True))


def _parquet(path: Path, batch_size: int) -> Iterator[Record]:
    n = 1
    try:
        with pq.ParquetFile(path) as f:
            for rb in f.iter_batches(batch_size=batch_size):
                for rec in rb.to_pylist():
                    yield n, rec
                    n += 1
    except (pa.ArrowException, OSError, ValueError) as e:  # ValueError: e.g. invalid UTF-8 in a string column
        raise InputError(f"{path}:{n}: unreadable Parquet file ({_first_line(e)})") from None

