"""The flow against a real S3 server on loopback: the same cells as a local store, nothing recomputed on rerun,
and no credential in any artifact."""

import pytest

from flows.label import label_flow
from schemas.artifacts import LABELS, generation_path, labels_path
from schemas.store import Store
from tests.conftest import tiny_flow_config

pytestmark = pytest.mark.slow


def _cells(m: dict) -> dict:
    return {(s["name"], s["fingerprint"]): s["rows"] for s in m["generate"] + m["score"]}


def test_s3_store_matches_local_store(tmp_path_factory, tiny_models, ray_session, prefect_harness, s3_server):
    tmp = tmp_path_factory.mktemp("s3flow")
    (tmp / "local").mkdir()
    (tmp / "s3").mkdir()
    local = label_flow(str(tiny_flow_config(tmp / "local", tiny_models)))["manifest"]
    cfg = tiny_flow_config(tmp / "s3", tiny_models, store={"url": "s3://zooter/runs-a", "options": s3_server})
    remote = label_flow(str(cfg))
    m = remote["manifest"]
    assert remote["manifest_uri"].startswith("s3://zooter/runs-a/")
    assert _cells(m) == _cells(local)  # same fingerprints, same row counts
    assert (m["labels"], m["router"], m["label_rows"]) == (local["labels"], local["router"], local["label_rows"])

    store = Store("s3://zooter/runs-a", s3_server)
    gen = m["generate"][0]
    assert store.exists(generation_path(gen["name"], gen["fingerprint"], 0))
    assert store.read_table(labels_path(m["labels"]), LABELS).num_rows == 12
    assert store.exists(f"routers/{m['router']}/router.json")

    again = label_flow(str(cfg))["manifest"]
    assert sum(s["cells_computed"] for s in again["generate"] + again["score"]) == 0

    # credentials never land in the store: grep every object
    for path in store.fs.find(store.root):
        blob = store.fs.cat(path)
        assert s3_server["secret"].encode() not in blob and s3_server["key"].encode() not in blob, path
