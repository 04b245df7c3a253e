"""The label flow's pipelined stages (scoring starts per shard while generation goes on) on tiny models, real Ray and
Prefect: the same cells, fingerprints and labels as the staged order (every expert to the end, then every reward
model), scoring's recorded start before generation's recorded end, and a failing generation job that fails the run
promptly with its stage named."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from flows.label import label_flow
from schemas.artifacts import LABELS, generation_path, labels_path
from schemas.config import load_config
from schemas.store import Store
from tasks.aggregate import ScoreSource, run_aggregate
from tasks.generate import expert_fingerprint, run_generate
from tasks.ingest import write_shards
from tasks.preflight import preflight
from tasks.score import rm_fingerprint, run_score
from tasks.tag import make_tagger, run_tag
from tests.conftest import Labeled, tiny_flow_config

pytestmark = pytest.mark.slow


def staged(config: Path) -> str:
    """The order before pipelining, step by step without Prefect: returns the labels fingerprint."""
    cfg = load_config(str(config))
    store = Store.from_config(cfg.store)
    shards = write_shards(store, preflight(cfg), cfg.data.shard_size).shards
    for e in cfg.experts:
        run_generate(store, e, shards)
    for rm in cfg.reward_models:
        run_score(store, rm, cfg.experts, shards)
    tagger = make_tagger(cfg.tagger, cfg)
    run_tag(store, tagger, shards)
    experts = [(e.name, expert_fingerprint(e)) for e in cfg.experts]
    sources = [ScoreSource(rm.name, rm_fingerprint(rm), rm.weight) for rm in cfg.reward_models]
    return run_aggregate(store, experts, sources, tagger.fingerprint, shards, cfg.aggregate,
                         cfg.data.test_fraction).fingerprint


def cells(root: Path) -> dict[str, tuple[str, pl.DataFrame]]:
    """Every generation, score and tag cell: relative path -> (fingerprint in its metadata, rows)."""
    out = {}
    for p in sorted([*root.glob("generations/*/*.parquet"), *root.glob("scores/*/*/*.parquet"),
                     *root.glob("tags/*/*.parquet")]):
        t = pq.read_table(p)
        meta = Store(str(root)).read_meta(p.relative_to(root).as_posix())
        out[p.relative_to(root).as_posix()] = meta["fingerprint"], pl.from_arrow(t)
    return out


def test_pipelined_flow_makes_the_staged_orders_cells_and_scoring_overlaps_generation(tmp_path, tiny_models,
                                                                                       ray_session, labeled: Labeled):
    # the pipelined run: the session's from-scratch label flow run on the same tiny config (read, never written)
    (tmp_path / "staged").mkdir()
    m = labeled.outcome.manifest
    labels_fp = staged(tiny_flow_config(tmp_path / "staged", tiny_models))

    piped, stepwise = cells(labeled.root), cells(tmp_path / "staged" / "store")
    assert sorted(piped) == sorted(stepwise)
    assert [sum(r.startswith(d) for r in piped) for d in ("generations/", "scores/")] == [2 * 3, 3 * 2 * 3]
    for rel, (fp, rows) in piped.items():
        assert fp == stepwise[rel][0], rel
        assert rows.equals(stepwise[rel][1]), rel  # greedy decoding: same answers, same scores
    assert m.labels == labels_fp
    a, b = (pl.from_arrow(Store(str(root)).read_table(labels_path(labels_fp), LABELS))
            for root in (labeled.root, tmp_path / "staged" / "store"))
    # equal to rounding: Polars' streaming engine may sum the tag means in another order (tasks.aggregate.run_aggregate)
    assert_frame_equal(a, b, check_exact=False)

    # Recorded job times: some reward model started scoring before the last generation job ended.
    assert min(s.jobs_from for s in m.score) < max(g.jobs_until for g in m.generate)
    assert all(s.jobs_from >= min(g.jobs_from for g in m.generate) for s in m.score)
    assert all(0 < r.busy <= 1 for r in m.generate) and {r.name for r in m.score if r.busy is None} == {"exact"}


def test_a_failing_generation_job_fails_the_run_promptly_naming_its_stage(tmp_path, tiny_models, ray_session,
                                                                         prefect_harness):
    config = tiny_flow_config(tmp_path, tiny_models)
    cfg = load_config(str(config))
    b = next(e for e in cfg.experts if e.name == "b")
    # A directory where expert b's shard-1 cell goes: its job cannot write the cell (the file there is broken, so
    # it is recomputed, and the atomic rename onto a directory fails inside the actor).
    (tmp_path / "store" / generation_path("b", expert_fingerprint(b), 1)).mkdir(parents=True)
    outcome: dict[str, BaseException | object] = {}

    def run() -> None:
        try:
            outcome["result"] = label_flow(str(config))
        except BaseException as e:  # noqa: BLE001 - asserted below
            outcome["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(600)  # a guard against a hang, not a time limit on the run
    assert not t.is_alive(), "the run hung after a generation job failed"
    err = outcome["error"]
    assert "in stage generate b" in getattr(err, "__notes__", []), err
    manifest = json.loads(next((tmp_path / "store" / "runs").glob("*/manifest.json")).read_text())
    assert manifest["status"] == "failed" and manifest["error"] and manifest["labels"] is None  # nothing after it ran
    assert "b" not in {g["name"] for g in manifest["generate"]}
