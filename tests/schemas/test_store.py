"""The store: atomic writes, validating reads, cell validity, safe paths."""

import os

import pyarrow as pa
import pytest

from schemas.artifacts import SCORES
from schemas.store import ArtifactError, Store


def _scores(n=3):
    return pa.table({"query_id": [f"q{i}" for i in range(n)], "score": [0.5] * n, "flag": pa.nulls(n, pa.string())})


def test_write_read_roundtrip_and_metadata(tmp_path):
    s = Store(str(tmp_path))
    s.write_table("scores/x/shard-00000.parquet", _scores(), SCORES, {"fingerprint": "abc", "stage": "scores"})
    assert s.read_table("scores/x/shard-00000.parquet", SCORES).num_rows == 3
    assert s.read_meta("scores/x/shard-00000.parquet")["fingerprint"] == "abc"
    assert s.valid_cell("scores/x/shard-00000.parquet", SCORES, "abc")
    assert not s.valid_cell("scores/x/shard-00000.parquet", SCORES, "other-fp")
    assert not s.valid_cell("scores/x/shard-00001.parquet", SCORES, "abc")
    # no temp files are left behind
    assert os.listdir(tmp_path / "scores" / "x") == ["shard-00000.parquet"]


def test_truncated_cell_is_not_valid(tmp_path):
    s = Store(str(tmp_path))
    s.write_table("c.parquet", _scores(), SCORES, {"fingerprint": "abc"})
    p = tmp_path / "c.parquet"
    p.write_bytes(p.read_bytes()[:-20])
    assert not s.valid_cell("c.parquet", SCORES, "abc")
    with pytest.raises(ArtifactError, match="unreadable Parquet"):
        s.read_table("c.parquet", SCORES)


def test_foreign_schema_is_rejected_with_column_names(tmp_path):
    s = Store(str(tmp_path))
    with pytest.raises(ArtifactError, match=r"missing columns \['score', 'flag'\], unexpected \['value'\]"):
        s.write_table("c.parquet", pa.table({"query_id": ["a"], "value": [1.0]}), SCORES)
    with pytest.raises(ArtifactError, match="'query_id' has nulls"):
        s.write_table("c.parquet", pa.table({"query_id": [None], "score": [1.0], "flag": [None]}), SCORES)


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "a/../../b", "a//b", "./a"])
def test_paths_cannot_escape_the_store(tmp_path, rel):
    with pytest.raises(ArtifactError, match="unsafe store path"):
        Store(str(tmp_path)).path(rel)


def test_a_remote_scan_is_one_get_per_cell(s3_server):
    """A label run's tail scans every score cell: on S3 that is one GET each (a pyarrow dataset over fsspec made
    2 HEAD + 1 GET per cell), the same rows as the local scan, and a missing or broken cell named."""
    import collections

    import polars as pl

    store = Store(f"s3://zooter/scan-{os.getpid()}", s3_server)
    rels = [f"scores/rm-fp/e-efp/shard-{i:05d}.parquet" for i in range(6)]
    for i, rel in enumerate(rels):
        store.write_table(rel, _scores(i + 1), SCORES, {"fingerprint": f"fp{i}"})  # metadata differs per cell
    calls: collections.Counter = collections.Counter()
    call_s3 = store.fs._call_s3

    async def counting(method, *a, **kw):
        calls[method] += 1
        return await call_s3(method, *a, **kw)

    store.fs._call_s3 = counting
    got = store.scan(rels).collect()
    assert dict(calls) == {"get_object": len(rels)}
    want = pl.concat([pl.from_arrow(store.read_table(r, SCORES)) for r in rels])
    assert got.equals(want) and got.height == 21

    with pytest.raises(ArtifactError, match=r"scores/rm-fp/e-efp/shard-00009.parquet: missing"):
        store.scan([*rels, "scores/rm-fp/e-efp/shard-00009.parquet"])
    store.fs.pipe_file(store.path(rels[2]), b"not parquet")
    with pytest.raises(ArtifactError, match="unreadable Parquet among 6 cells"):
        store.scan(rels)
