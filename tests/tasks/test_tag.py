"""tag: the tagger interface and its cells."""

import polars as pl
import pyarrow as pa

from schemas.artifacts import QUERIES, SCHEMA_VERSION, TAGS, queries_path, tags_path
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
    first = run_tag(s, tagger, [0])
    assert (first.computed, first.rows, first.fingerprint) == ([0], 2, tagger.fingerprint)
    t = pl.from_arrow(s.read_table(tags_path(tagger.fingerprint, 0), TAGS))
    assert t["tags"].to_list() == [["math"], []]
    assert s.read_meta(tags_path(tagger.fingerprint, 0)) == {"schema_version": SCHEMA_VERSION, "stage": "tags",
                                                              "fingerprint": tagger.fingerprint, "shard": 0}
    again = run_tag(s, tagger, [0])
    assert (again.computed, again.skipped) == ([], [0])  # done cells are not recomputed


def test_taggers_have_distinct_fingerprints(tmp_path):
    s = _store(tmp_path)
    none, col = make_tagger(TaggerConfig(kind="none")), make_tagger(TaggerConfig(kind="column"))
    assert none.fingerprint != col.fingerprint
    assert (col.fingerprint, none.fingerprint) == ("column-c9c9dfd8", "none-931fb2b2")  # existing stores' tag cells
    run_tag(s, none, [0])
    assert pl.from_arrow(s.read_table(tags_path(none.fingerprint, 0), TAGS))["tags"].to_list() == [[], []]
