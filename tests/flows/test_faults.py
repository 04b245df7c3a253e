"""Faults cost time, never data: a killed actor, a SIGKILLed run, two concurrent relabels, corrupted cells, NaN
rewards and empty answers (an S3 outage mid-run is tests/flows/test_s3.py's). Real Ray, Prefect, Parquet, tiny
models (synthetic ones where leases, resumption or a dead actor are the point, not a model's output); each test
counts cells and rows exactly."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

from flows.cli import app
from flows.label import label_flow
from schemas.artifacts import GENERATIONS, LABELS, SCORES, labels_path
from schemas.config import ALLOW_SYNTHETIC, load_config
from schemas.store import Store
from tests.conftest import QUERIES as TINY_QUERIES
from tests.conftest import Labeled, copy_labeled, json_doc, synthetic_models, tiny_flow_config, tiny_router

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


# --- helpers ---------------------------------------------------------------------------------------------------
def _config(tmp: Path, tiny_models, edit=None, labeled: Labeled | None = None, **store) -> Path:
    """A tiny config with `store` options, edited by `edit`; on a copy of the session's labelled store if given."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = copy_labeled(labeled, tmp, tiny_models) if labeled else tiny_flow_config(tmp, tiny_models)
    cfg = yaml.safe_load(path.read_text())
    cfg["store"] = {"url": cfg["store"], **store}
    if edit:
        edit(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cells(root: Path) -> dict[str, Path]:
    """Every generation and score cell under a local store that validates (its fingerprint is in its dir name)."""
    s, out = Store(str(root)), {}
    for p in sorted(root.glob("generations/*/shard-*.parquet")) + sorted(root.glob("scores/*/*/shard-*.parquet")):
        rel = p.relative_to(root).as_posix()
        stage_dir = rel.split("/")[1]
        schema = GENERATIONS if rel.startswith("generations/") else SCORES
        if s.valid_cell(rel, schema, stage_dir.rsplit("-", 1)[1]):
            out[rel] = p
    return out


def _no_duplicate_ids(root: Path) -> None:
    for p in _cells(root).values():
        ids = pq.read_table(p, columns=["query_id"])["query_id"].to_pylist()
        assert len(ids) == len(set(ids)) and ids, p


def _labels(store: Store, fp: str) -> pl.DataFrame:
    return pl.from_arrow(store.read_table(labels_path(fp), LABELS)).sort("query_id")


def _computed(m: dict) -> int:
    return sum(s["cells_computed"] for s in m["generate"] + m["score"])


def _manifests(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("runs/*/manifest.json"))]


def _env(tmp: Path, ray_tmp: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    # one Prefect API for every process (the test's harness); each process starts its own embedded Ray
    return {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": PREFECT_API_URL.value(),
            "RAY_TMPDIR": ray_tmp, "PREFECT_HOME": str(tmp / "prefect-home")}


def _kill_tree(ray_tmp: str) -> None:
    """Whatever is left of a killed run's Ray (its processes name their temp dir) dies too."""
    for p in psutil.process_iter(["cmdline"]):
        if any(ray_tmp in a for a in p.info["cmdline"] or []):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def _with_routers(src: Path, root: Path) -> None:
    """Only the routers (hard links) of the store at `src` in the empty store at `root`: a run that makes the same
    labels reuses that router instead of fitting one; its cells and labels are still all computed."""
    shutil.copytree(src / "routers", root / "routers", copy_function=os.link)


def _synthetic(tiny_models):
    """A config edit: synthetic experts and reward models, the router on the tiny encoder."""
    def edit(cfg: dict) -> None:
        synthetic_models(cfg)
        cfg["router"] = tiny_router(tiny_models)
    return edit


def _cli(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)  # noqa: SIM115


# --- 1. an expert actor is killed mid-shard ----------------------------------------------------------------------
def _dies_once(build, marker: str):
    """The real generator, whose process kills itself (SIGKILL) in the middle of its first shard."""
    def wrapped():
        model = build()
        generate = model.generate

        def once(*a, **kw):
            if not os.path.exists(marker):
                Path(marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return generate(*a, **kw)

        model.generate = once
        return model
    return wrapped


def test_killed_actor_is_replaced_and_its_shard_redone(tmp_path, tiny_models, ray_session, monkeypatch):
    import tasks.generate as generate
    from tasks.ingest import read_queries, write_shards

    monkeypatch.setenv(ALLOW_SYNTHETIC, "1")  # the actor's death is the point, not what its model computes
    cfg = load_config(_config(tmp_path, tiny_models, synthetic_models))
    store = Store(cfg.store.url)
    shards = write_shards(store, read_queries(cfg.data), 2).shards  # 6 shards of 2 queries
    marker = str(tmp_path / "killed")
    real = generate.generator_builder
    monkeypatch.setattr(generate, "generator_builder", lambda spec: _dies_once(real(spec), marker))

    res = generate.run_generate(store, cfg.experts[0], shards)

    assert Path(marker).exists()  # the actor did die mid-shard
    assert res.computed == shards and res.rows == len(TINY_QUERIES)
    root = Path(cfg.store.url)
    assert len(_cells(root)) == 6
    _no_duplicate_ids(root)
    got = pl.concat([pl.read_parquet(p) for p in _cells(root).values()])
    assert sorted(got["query_id"]) == sorted(q["id"] for q in TINY_QUERIES)
    assert not list(root.rglob(".tmp-*")) and not list((root / "leases").rglob("*.lease"))


# --- 2. the flow's process is SIGKILLed mid-run; the same command again ------------------------------------------
def test_sigkilled_run_resumes_without_recomputing_a_finished_cell(tmp_path, tiny_models, two_relabels):
    # the reference: the relabels' uninterrupted runs of the same config (synthetic models: resumption is the point)
    path = _config(tmp_path / "run", tiny_models, _synthetic(tiny_models), lease_ttl_s=5)
    total = 6 + 18  # 3 shards: 6 generation + 18 score cells
    ref_root = two_relabels[0] / "store"
    ref = _manifests(ref_root)[0]
    root = tmp_path / "run" / "store"
    _with_routers(ref_root, root)

    with tempfile.TemporaryDirectory(prefix="zray-") as ray_tmp:  # Ray's socket paths must stay short
        env = {**_env(tmp_path, ray_tmp), ALLOW_SYNTHETIC: "1"}
        proc = _cli(["run", str(path)], env, tmp_path / "killed.log")
        t0 = time.monotonic()
        while len(list(root.glob("generations/*/shard-*.parquet"))) < 4:  # of 6
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 600, "no generation cell appeared"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _kill_tree(ray_tmp)
        time.sleep(1)
        done = set(_cells(root))
        assert 4 <= len(done) < total

        rerun = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path), "--json"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=900)
        _kill_tree(ray_tmp)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    m = json_doc(rerun.stdout)["manifest"]
    assert _computed(m) == total - len(done)  # not one finished cell computed again
    assert sum(s["cells_reused"] for s in m["generate"] + m["score"]) == len(done)
    assert len(_cells(root)) == total
    _no_duplicate_ids(root)
    assert m["labels"] == ref["labels"]
    store, ref_store = Store(str(root)), Store(str(ref_root))
    # the same labels, to rounding (Polars' streaming sums may run in another order: tasks.aggregate.run_aggregate)
    assert_frame_equal(_labels(store, m["labels"]), _labels(ref_store, ref["labels"]), check_exact=False)
    statuses = sorted(x["status"] for x in _manifests(root))
    assert statuses == ["completed"]  # the killed run never got to write its manifest; the rerun did


# --- 3. two relabels on the same store at the same time; 4. corrupted cells ---------------------------------------
@pytest.fixture(scope="module")
def two_relabels(tmp_path_factory, tiny_models, prefect_harness):
    """Two `zooter relabel` processes on one empty store at once, on synthetic models (the leases are the point;
    what a real model computes in this flow is the session run's test). The router, on the tiny encoder, is fitted
    by the runs themselves."""
    tmp = tmp_path_factory.mktemp("concurrent")
    path = _config(tmp, tiny_models, _synthetic(tiny_models), lease_ttl_s=30)
    with tempfile.TemporaryDirectory(prefix="zray-") as r1, tempfile.TemporaryDirectory(prefix="zray-") as r2:
        procs = [_cli(["relabel", str(path), "--json"], {**_env(tmp, r), ALLOW_SYNTHETIC: "1"},
                      tmp / f"relabel{i}.log") for i, r in enumerate((r1, r2))]
        try:
            codes = [p.wait(timeout=1200) for p in procs]
        finally:
            for p, r in zip(procs, (r1, r2), strict=True):
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                _kill_tree(r)
    logs = [(tmp / f"relabel{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    return tmp, path


def test_concurrent_relabels_compute_each_cell_once(two_relabels):
    tmp, _ = two_relabels
    root = tmp / "store"
    ms = _manifests(root)
    assert len(ms) == 2 and all(m["status"] == "completed" for m in ms)  # both runs recorded
    assert max(m["started"] for m in ms) < min(m["finished"] for m in ms)  # and they did overlap
    assert sum(_computed(m) for m in ms) == 24  # nothing computed twice: 6 generation + 18 score cells in all
    assert all(_computed(m) + sum(s["cells_reused"] for s in m["generate"] + m["score"]) == 24 for m in ms)
    assert len(_cells(root)) == 24
    _no_duplicate_ids(root)
    queries = Store(str(root)).scan([p.relative_to(root).as_posix() for p in root.glob("queries/*.parquet")])
    assert queries.collect().height == len(TINY_QUERIES)  # both ingested: each query stored once
    assert len(list(root.glob("queries/*.parquet"))) == 3
    assert ms[0]["labels"] == ms[1]["labels"] and ms[0]["router"] == ms[1]["router"]
    assert not list(root.rglob("*.lease")) and not list(root.rglob(".tmp-*"))


def test_corrupted_cells_are_detected_logged_and_recomputed(two_relabels, tmp_path, ray_session, caplog,
                                                            monkeypatch):
    monkeypatch.setenv(ALLOW_SYNTHETIC, "1")  # the relabels' config
    src, path = two_relabels
    shutil.copytree(src / "store", tmp_path / "store")
    cfg = yaml.safe_load(path.read_text())
    cfg["store"]["url"] = str(tmp_path / "store")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    root = tmp_path / "store"
    cells = sorted(_cells(root))
    gen = next(c for c in cells if c.startswith("generations/"))
    score = next(c for c in cells if c.startswith("scores/") and not c.endswith(gen[-19:]))
    (root / gen).write_bytes((root / gen).read_bytes()[:-40])  # truncated
    (root / score).write_bytes(b"PAR1 not a parquet file")  # garbage
    with caplog.at_level(logging.WARNING, logger="zooter.store"):
        m = label_flow(str(tmp_path / "config.yaml")).manifest.model_dump(mode="json")
    assert _computed(m) == 2
    assert sum(s["cells_repaired"] for s in m["generate"] + m["score"]) == 2
    assert f"{gen} is invalid (unreadable Parquet" in caplog.text and f"{score} is invalid" in caplog.text
    assert len(_cells(root)) == 24
    assert m["labels"] == json.loads(next(root.glob("runs/*/manifest.json")).read_text())["labels"]


# --- 5. NaN/inf rewards and empty answers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken_models(tiny_models, tmp_path_factory):
    """A classifier reward model whose head returns NaN, and an LM whose every answer decodes to ''."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("broken")
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_models["rm"])
    with torch.no_grad():
        rm.classifier.bias.fill_(float("nan"))
    rm.save_pretrained(root / "nan_rm")
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["lm_a"])
    with torch.no_grad():
        lm.lm_head.weight.zero_()  # every logit 0: greedy picks token 0, [PAD], a special token decoded as ''
    lm.save_pretrained(root / "mute")
    tok = AutoTokenizer.from_pretrained(tiny_models["rm"])
    for d in ("nan_rm", "mute"):
        tok.save_pretrained(root / d)
    return {"nan_rm": root / "nan_rm", "mute": root / "mute"}


def test_nan_rewards_and_empty_answers_are_kept_flagged_and_counted(tmp_path, tiny_models, broken_models, labeled):
    def edit(c):
        res = c["experts"][1]["resources"]
        c["experts"].append({"name": "mute", "model": str(broken_models["mute"]), "dtype": "float32",
                             "sampling": {"max_new_tokens": 4}, "resources": res})
        c["reward_models"].append({"name": "nan", "kind": "classifier", "model": str(broken_models["nan_rm"]),
                                   "dtype": "float32", "resources": res})
        c["router"] = tiny_router(tiny_models)  # fitted on the tiny encoder: the flags and labels are checked
        # a reward model whose every score is NaN fails the run at the default 1 % of failed rows, naming the stage
        # (tests/tasks/test_row_failures.py); here its rows are let through to check how they are kept and counted
        c["data"]["max_failed_fraction"] = 1.0

    path = _config(tmp_path, tiny_models, edit, labeled)  # a and b's cells for judge, rm and exact are reused
    m = label_flow(str(path)).manifest.model_dump(mode="json")
    n = len(TINY_QUERIES)
    assert _computed(m) == 3 + 3 * 3 + 3 * 3  # mute's generations, mute's scores by judge/rm/exact, nan's scores
    flags = {s["name"]: s["flags"] for s in m["score"]}
    # every RM flags mute's 12 empty answers; the NaN RM also flags the 2 real experts' 24 rows
    assert flags == {"judge": {"empty_response": n}, "rm": {"empty_response": n},
                     "exact": {"empty_response": n}, "nan": {"empty_response": n, "nonfinite": 2 * n}}
    store = Store(str(tmp_path / "store"))
    cells = _cells(tmp_path / "store")
    rows = pl.concat([pl.read_parquet(p) for c, p in cells.items() if c.startswith("scores/nan-")])
    assert rows.height == 3 * n and rows["score"].null_count() == 3 * n  # kept, with a null score
    # the documented rule: an expert without any score for a query gets the query's lowest reward
    lab = _labels(store, m["labels"])
    assert lab.height == n
    rewards = lab["rewards"].to_list()
    assert all(r[2] == min(r) for r in rewards)
    # the counts show in `zooter inspect`
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "store"), "--json"])
    info = json_doc(res.output)
    assert info["runs"][-1]["flagged"] == 4 * n + 2 * n
    assert {"reward_model": "nan", "expert": "a", "empty_response": 0, "nonfinite": n} in info["cells"]["flags"]
    text = CliRunner().invoke(app, ["inspect", str(tmp_path / "store")], terminal_width=200).output
    assert "Flagged score rows" in text
