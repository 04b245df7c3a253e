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
