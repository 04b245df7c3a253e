"""ingest: ids and texts kept as written, validation messages with file:line (physical lines), append-only shards."""

import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.artifacts import QUERIES, queries_path
from schemas.config import DataConfig
from schemas.store import Store
from tasks.ingest import InputError, read_queries, text_id, write_shards


def _cfg(path, **kw):
    return DataConfig(path=str(path), tags_field="tags", reference_field="reference", **kw)


def _write(tmp_path, lines, name="q.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return p


def test_ids_tags_and_references(tmp_path):
    p = _write(tmp_path, [json.dumps({"text": "hello", "tags": "greet"}),
                          json.dumps({"text": "2+2?", "tags": ["math", "easy"], "reference": 4}),
                          json.dumps({"text": "hello"})])  # same text, same id: deduplicated
    df = read_queries(_cfg(p))
    assert df["query_id"].to_list() == [text_id("hello"), text_id("2+2?")]
    assert df["input_tags"].to_list() == [["greet"], ["math", "easy"]]
    assert df["reference"].to_list() == [None, "4"]
    assert df["source_line"].to_list() == [1, 2]


@pytest.mark.parametrize("lines,match", [
    (['{"text": "ok"}', '{"text": "broken"'], r"q.jsonl:2: malformed JSON"),
    (['{"text": "ok"}', '{"other": 1}'], r"q.jsonl:2: missing field 'text'"),
    (['{"text": "   "}'], r"q.jsonl:1: field 'text' must be a non-empty string with a visible character"),
    (['{"text": "ok"}', '{"text": "\\u200b\\u200d\\ufeff\\t"}'], r"q.jsonl:2: field 'text' must be a non-empty string"),
    (['{"text": "ok"}', '{"text": "a\\ud800b"}'], r"q.jsonl:2: invalid Unicode \(lone surrogate \\ud800"),
    (['{"text": "a", "text": "b"}'], r"q.jsonl:1: malformed JSON \(key 'text' appears twice in one object\)"),
    (['{"text": "a", "x": NaN}'], r"q.jsonl:1: malformed JSON \(NaN is not a JSON number\)"),
    (['{"text": "a", "x": 1e999}'], r"q.jsonl:1: malformed JSON \(number 1e999 is out of range\)"),
    (['{"text": "a", "reference": {"x": 1}}'], r"q.jsonl:1: field 'reference' must be a string .* or an integer, "
                                               r"got dict \{\"x\": 1\}"),
    (['{"text": "a", "reference": 0.5}'], r"q.jsonl:1: field 'reference' must be .*, got float 0.5"),
    ([b'{"text": "caf\xe9"}'], r"q.jsonl:1: not valid UTF-8"),
    (['[1, 2]'], r"q.jsonl:1: each line must be a JSON object"),
    (['{"text": "a", "tags": 3}'], r"q.jsonl:1: tags must be a string or a list"),
])
def test_bad_lines_name_file_and_line(tmp_path, lines, match):
    with pytest.raises(InputError, match=match):
        read_queries(_cfg(_write(tmp_path, lines)))


@pytest.mark.parametrize("value,error", [
    ('"007"', None), ("7", None), ('"\\u05e9\\u05dc\\u05d5\\u05dd"', None),
    ("1.0", "got float 1.0"), ("true", "got bool true"), ('{"a": 1}', 'got dict {"a": 1}'), ("[1]", "got list [1]"),
    ('""', "got ''"), ('"\\u200b"', "got '\\u200b'"),
])
def test_json_ids_are_strings_or_integers(tmp_path, value, error):
    p = _write(tmp_path, ['{"id": "first", "text": "x"}', f'{{"id": {value}, "text": "y"}}'])
    if error is None:
        assert read_queries(_cfg(p, id_field="id"))["query_id"].to_list() == ["first", str(json.loads(value))]
    else:
        with pytest.raises(InputError, match="q.jsonl:2: field 'id' must be a string with a visible character or "
                                             "an integer, " + re.escape(error)):
            read_queries(_cfg(p, id_field="id"))


def test_csv_cells_are_text_as_written_and_lines_are_physical(tmp_path):
    p = tmp_path / "q.csv"
    p.write_bytes('\ufeffid,text,reference,tags\r\n007,"two\r\nlines",1.50,math\r\n1e3,plain,,\r\n'
                  '0x1F,"three\nmore\nlines",,\r\n'.encode())
    df = read_queries(_cfg(p, id_field="id"))
    assert df["query_id"].to_list() == ["007", "1e3", "0x1F"]
    assert df["text"].to_list() == ["two\r\nlines", "plain", "three\nmore\nlines"]
    assert df["reference"].to_list() == ["1.50", None, None] and df["input_tags"].to_list() == [["math"], [], []]
    assert df["source_line"].to_list() == [2, 4, 5]
    p.write_text('id,text\n1,"a\nb\nc"\n2,"  "\n')
    with pytest.raises(InputError, match=r"q.csv:5: field 'text' must be a non-empty string"):
        read_queries(_cfg(p, id_field="id"))


@pytest.mark.parametrize("body,match", [
    (b'id,text\n1,ok\n2,caf\xe9\n', r"q.csv:3: not valid UTF-8"),
    (b'id,text\n1,ok\n2,ok,extra\n', r"q.csv:3: 3 fields where the header has 2"),
    (b'id,text,id\n1,ok,2\n', r"q.csv:1: column 'id' appears twice in the header"),
    (b'id,text\n1,"ok\n2,unclosed\n', r"q.csv:2: malformed CSV \(unexpected end of data\)"),
    (b'id,text\n1,"a"b\n', r"q.csv:2: malformed CSV"),
    (b'id,text\n1,"a\nb"\n,c\n', r"q.csv:4: field 'id' must be a string with a visible character"),
])
def test_bad_csv_names_the_physical_line(tmp_path, body, match):
    p = tmp_path / "q.csv"
    p.write_bytes(body)
    with pytest.raises(InputError, match=match):
        read_queries(_cfg(p, id_field="id"))


def test_parquet_ids_keep_their_text_and_other_types_are_refused(tmp_path):
    p = tmp_path / "q.parquet"
    pq.write_table(pa.table({"id": pa.array([7, 8], pa.int32()), "text": ["a", "b"], "reference": ["x", None]}), p)
    df = read_queries(_cfg(p, id_field="id"))
    assert df["query_id"].to_list() == ["7", "8"] and df["reference"].to_list() == ["x", None]
    for column, values, key in [("id", [1.0, 2.0], "data.id_field"), ("reference", [[1], [2]], "data.reference_field"),
                                ("tags", [{"a": 1}, {"a": 2}], "data.tags_field"), ("text", [1, 2], "data.text_field")]:
        pq.write_table(pa.table({"id": ["a", "b"], "text": ["a", "b"]} | {column: values}), p)
        with pytest.raises(InputError, match=rf"q.parquet: column '{column}' is .*; it must hold .* \({key}\)"):
            read_queries(_cfg(p, id_field="id"))


def test_a_fifo_or_a_folder_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "q.jsonl")
    with pytest.raises(InputError, match=r"q.jsonl: data file is a FIFO, not a regular file \(data.path\)"):
        read_queries(_cfg(tmp_path / "q.jsonl"))
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(InputError, match=r"d.jsonl: data file is a directory, not a regular file"):
        read_queries(_cfg(tmp_path / "d.jsonl"))


def test_a_byte_order_mark_and_crlf_lines_are_read_as_text(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"id": 1, "text": "a"}\r\n{"id": "2", "text": "\\u202eb"}\r\n')
    df = read_queries(_cfg(p, id_field="id"))
    assert df["query_id"].to_list() == ["1", "2"] and df["text"].to_list() == ["a", "\u202eb"]


def test_limit_reads_only_the_first_records(tmp_path):
    p = _write(tmp_path, ['{"text": "a"}', '{"text": "b"}', '{"text": "broken'])
    assert read_queries(_cfg(p, limit=2))["text"].to_list() == ["a", "b"]


def test_duplicate_id_with_different_text(tmp_path):
    p = _write(tmp_path, ['{"id": 1, "text": "a"}', '{"id": 1, "text": "b"}'])
    with pytest.raises(InputError, match=r"q.jsonl:2: id '1' was used at line 1 with a different text"):
        read_queries(_cfg(p, id_field="id"))


def test_parquet_input_with_wrong_columns(tmp_path):
    import polars as pl

    p = tmp_path / "q.parquet"
    pl.DataFrame({"question": ["a"]}).write_parquet(p)
    with pytest.raises(InputError, match=r"q.parquet:1: missing field 'text'"):
        read_queries(_cfg(p))


def test_shards_are_append_only(tmp_path):
    store = Store(str(tmp_path / "store"))
    p = _write(tmp_path, [json.dumps({"text": f"q{i}"}) for i in range(5)])
    first = write_shards(store, read_queries(_cfg(p)), shard_size=2)
    assert (first.shards, first.n_new) == ([0, 1, 2], 5)
    before = {s: store.read_table(queries_path(s), QUERIES) for s in first.shards}
    p2 = _write(tmp_path, [json.dumps({"text": f"q{i}"}) for i in range(8)], "q2.jsonl")
    second = write_shards(store, read_queries(_cfg(p2)), shard_size=2)
    assert second.new_shards == [3, 4] and second.n_new == 3 and second.n_queries == 8
    for s, t in before.items():
        assert store.read_table(queries_path(s), QUERIES).equals(t)
    again = write_shards(store, read_queries(_cfg(p2)), shard_size=2)
    assert again.new_shards == [] and again.n_new == 0


def test_id_clash_with_store(tmp_path):
    store = Store(str(tmp_path / "store"))
    write_shards(store, read_queries(_cfg(_write(tmp_path, ['{"id": "x", "text": "a"}']), id_field="id")), 2)
    clash = read_queries(_cfg(_write(tmp_path, ['{"id": "x", "text": "b"}'], "b.jsonl"), id_field="id"))
    with pytest.raises(InputError, match="already in the store"):
        write_shards(store, clash, 2)
