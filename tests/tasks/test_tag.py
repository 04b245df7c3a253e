"""tag: the tagger interface and its cells."""

import polars as pl
import pyarrow as pa

from schemas.artifacts import QUERIES, TAGS, queries_path, tags_path
from schemas.config import TaggerConfig
from schemas.store import Store
from tasks.tag import make_tagger, run_tag


def _store(tmp_path):
    s = Store(str(tmp_path))
    s.write_table(queries_path(0), pa.table({
        "query_id": ["a", "b"], "text": ["x", "y"], "input_tags": [["math"], []], "reference": [None, None],
        "split": [None, None], "source_line": [1, 2]}), QUERIES)
    return s


def test_column_tagger_writes_one_cell_per_shard_once(tmp_path):
    s = _store(tmp_path)
    tagger = make_tagger(TaggerConfig(kind="column"))
    assert run_tag(s, tagger, [0]) == 1
    t = pl.from_arrow(s.read_table(tags_path(tagger.fingerprint, 0), TAGS))
    assert t["tags"].to_list() == [["math"], []]
    assert run_tag(s, tagger, [0]) == 0  # done cells are not recomputed


def test_taggers_have_distinct_fingerprints(tmp_path):
    s = _store(tmp_path)
    none, col = make_tagger(TaggerConfig(kind="none")), make_tagger(TaggerConfig(kind="column"))
    assert none.fingerprint != col.fingerprint
    run_tag(s, none, [0])
    assert pl.from_arrow(s.read_table(tags_path(none.fingerprint, 0), TAGS))["tags"].to_list() == [[], []]
