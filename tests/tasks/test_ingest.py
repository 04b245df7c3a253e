"""ingest: ids, validation messages with file:line, append-only shards."""

import json

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
    (['{"text": "   "}'], r"q.jsonl:1: field 'text' must be a non-empty string"),
    ([b'{"text": "caf\xe9"}'], r"q.jsonl:1: not valid UTF-8"),
    (['[1, 2]'], r"q.jsonl:1: each line must be a JSON object"),
    (['{"text": "a", "tags": 3}'], r"q.jsonl:1: tags must be a string or a list"),
])
def test_bad_lines_name_file_and_line(tmp_path, lines, match):
    with pytest.raises(InputError, match=match):
        read_queries(_cfg(_write(tmp_path, lines)))


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
