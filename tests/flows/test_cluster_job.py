"""`cluster/rayjob.yaml` as users run it: its entrypoint and runtime env, submitted through Ray's job submission API to
a two-node cluster whose nodes share no disk (tests/clusterutil.py), with the store and the models on S3 (moto on
127.0.0.1). The head offers no CPUs, so every stage runs on the isolated worker node; the run must reach the same
cells, labels, router and evaluation as a local run of the same config: that run, on a copy of the cluster's store,
finds every cell the cluster computed at the address it computes itself, so it computes none.
"""

import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
import yaml

from schemas.store import Store
from tests.clusterutil import AUTH, ROOT, NoSharedDiskCluster
from tests.conftest import QUERIES, write_jsonl

pytestmark = pytest.mark.slow

BUCKET = "zooter"
# What the job's working_dir carries (cluster/rayjob.yaml: `git archive ... flows tasks cluster schemas examples`)
SOURCES = ("flows", "tasks", "cluster", "schemas", "examples")
JOB_TIMEOUT_S = 1200
RAYJOB, EXAMPLE = ROOT / "cluster" / "rayjob.yaml", ROOT / "examples" / "cluster.yaml"


def _node_env(s3: dict) -> dict[str, str]:
    """What both `ray start`s carry, as a cluster's nodes would: the store's endpoint and credentials, offline."""
    return {"AWS_ENDPOINT_URL": s3["endpoint_url"], "AWS_ACCESS_KEY_ID": s3["key"],
            "AWS_SECRET_ACCESS_KEY": s3["secret"], "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "RAY_USAGE_STATS_ENABLED": "0",
            # each run starts a temporary Prefect API; two runs at once on 2 cores start it slower than the default
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def _client(s3: dict):
    return boto3.client("s3", endpoint_url=s3["endpoint_url"], aws_access_key_id=s3["key"],
                        aws_secret_access_key=s3["secret"], region_name="us-east-1")


def _upload_models(s3: dict, tiny_models: dict[str, Path], prefix: str) -> dict[str, str]:
    """The tiny models as S3 prefixes (`model: s3://...`): the worker node cannot see the test's tmp dir."""
    client = _client(s3)
    out = {}
    for name in ("lm_a", "lm_b", "rm"):
        for f in sorted(tiny_models[name].iterdir()):
            client.upload_file(str(f), BUCKET, f"{prefix}/{name}/{f.name}")
        out[name] = f"s3://{BUCKET}/{prefix}/{name}/"
    return out


def _config(base: dict, store: str, data: str, models: dict[str, str]) -> dict:
    """examples/cluster.yaml with the tiny run in it: 12 queries in 3 shards, 2 experts, 3 reward models, a router
    on frozen encoder features (so the embed stage runs). Its `ray` section (the cluster to join) is kept."""
    res = {"num_cpus": 1, "batch_size": 4, "threads": 1}
    return {**base, "name": "tiny-cluster", "store": store,
            "data": {"path": data, "text_field": "text", "id_field": "id", "tags_field": "tags",
                     "reference_field": "reference", "shard_size": 4, "test_fraction": 0.25},
            "tagger": {"kind": "column"},
            "experts": [
                {"name": "a", "model": models["lm_a"], "dtype": "float32", "prompt": "fewshot_qa",
                 "sampling": {"max_new_tokens": 6, "stop": ["\n"]}, "resources": res},
                {"name": "b", "model": models["lm_b"], "dtype": "float32", "sampling": {"max_new_tokens": 6},
                 "resources": res}],
            "reward_models": [
                {"name": "judge", "kind": "loglik", "model": models["lm_a"], "dtype": "float32", "resources": res},
                {"name": "rm", "kind": "classifier", "model": models["rm"], "dtype": "float32", "weight": 0.5,
                 "resources": res},
                {"name": "exact", "kind": "verifiable"}],
            "router": {"encoder": "packaged:all-minilm-l6-v2", "freeze_encoder": True, "epochs": 2, "batch_size": 4,
                       "max_length": 32, "cpus_per_worker": 1}}


def _copy_store(s3: dict, src: str, dst: str) -> None:
    """The store under s3://BUCKET/src/ copied to dst/, its run manifests left out."""
    client = _client(s3)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{src}/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"].removeprefix(f"{src}/")
            if not rel.startswith("runs/"):
                client.copy_object(Bucket=BUCKET, Key=f"{dst}/{rel}", CopySource={"Bucket": BUCKET, "Key": obj["Key"]})


def _working_dir(dest: Path, cfg: dict) -> Path:
    """The job's working_dir, built from the checkout, with examples/cluster.yaml replaced by `cfg`."""
    for d in SOURCES:
        shutil.copytree(ROOT / d, dest / d, ignore=shutil.ignore_patterns("__pycache__"))
    write_jsonl(dest / "examples" / "data" / "tiny.jsonl", QUERIES)
    (dest / "examples" / "cluster.yaml").write_text(yaml.safe_dump(cfg))
    return dest


def _local_run(tmp: Path, cfg: dict, s3: dict, monkeypatch) -> dict:
    """The same config run by this process's label flow, on the session's Ray and Prefect API (it computes no cell:
    each is in the copied store), with the model sources' S3 environment the nodes have; its manifest."""
    from flows.label import label_flow

    path = tmp / "local.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for k, v in _node_env(s3).items():
        monkeypatch.setenv(k, v)
    return label_flow(str(path)).manifest.model_dump(mode="json")


def _submit_and_wait(cluster: NoSharedDiskCluster, workdir: Path, cache: Path) -> str:
    """Submit rayjob.yaml's entrypoint and runtime env, its working_dir pointed at `workdir`; return the job's
    logs once it succeeded."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    spec = yaml.safe_load(RAYJOB.read_text())["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    runtime_env["working_dir"] = str(workdir)
    # The image's cache path (/home/ray/...) does not exist here: each node gets a node-local cache at this path
    # instead (the worker's is a private tmpfs).
    runtime_env.setdefault("env_vars", {})["ZOOTER_CACHE"] = str(cache)
    client = JobSubmissionClient(cluster.dashboard)
    job = client.submit_job(entrypoint=spec["entrypoint"], runtime_env=runtime_env)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(job)
            break
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, f"job {job}: {status}\n{logs[-12000:]}\n{cluster.logs()}"
    return logs


def test_submitted_job_on_a_cluster_without_shared_disk(tmp_path, tmp_path_factory, tiny_models, s3_server,
                                                        ray_session, prefect_harness, monkeypatch, caplog):
    t0 = time.monotonic()
    caplog.set_level(logging.WARNING, logger="werkzeug")  # moto logs every request
    for k, v in AUTH.items():  # this process's job and state clients send the cluster's token
        monkeypatch.setenv(k, v)
    run = uuid.uuid4().hex[:8]
    models = _upload_models(s3_server, tiny_models, f"models-{run}")
    base = yaml.safe_load(EXAMPLE.read_text())
    assert base["ray"]["address"] == "auto"
    cluster_store, local_store = f"s3://{BUCKET}/cluster-{run}", f"s3://{BUCKET}/local-{run}"
    workdir = _working_dir(tmp_path / "src", _config(base, cluster_store, "data/tiny.jsonl", models))
    local_cfg = _config(base, local_store, str(write_jsonl(tmp_path / "q.jsonl", QUERIES)), models)
    # its router fitted in this process (Ray Train's local mode): one worker's computation, the same router address
    local_cfg.update(ray={"address": None, "num_cpus": 2}, router={**local_cfg["router"], "num_workers": 0})

    cache = Path(f"/tmp/zc-cache-{run}")  # node-local model caches: the worker's is hidden behind a tmpfs
    marker = tmp_path / "only-the-head-sees-this"
    marker.write_text("x")
    cache.mkdir()
    try:
        with NoSharedDiskCluster(_node_env(s3_server), hide=[tmp_path_factory.getbasetemp(), cache],
                                 keep=[p for p in [Path(os.environ["ZOOTER_CACHE"])] if p.is_dir()]) as cluster:
            probe = cluster.probe([ROOT / "README.md", marker, tiny_models["lm_a"] / "config.json",
                                   cluster.base / "head" / "session_latest", Path(sys.executable)])
            head = probe["head"]
            (worker,) = set(probe["seen"]) - {head}
            assert probe["cpus"] == {head: 0, worker: 2}
            # no shared disk: the worker sees none of the head's files, but the virtualenv (the cluster image)
            assert list(probe["seen"][head].values()) == [True] * 5
            assert list(probe["seen"][worker].values()) == [False] * 4 + [True]

            logs = _submit_and_wait(cluster, workdir, cache)
            from ray.util.state import list_actors

            train_workers = list_actors(address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")],
                                        detail=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    _copy_store(s3_server, f"cluster-{run}", f"local-{run}")
    expected = _local_run(tmp_path, local_cfg, s3_server, monkeypatch)

    store = Store(cluster_store, s3_server)
    (path,) = store.fs.glob(f"{store.root}/runs/*/manifest.json")
    m = json.loads(store.fs.cat(path))
    assert m["status"] == "completed", logs[-5000:]
    (plan,) = store.fs.glob(f"{store.root}/runs/*/plan.json")
    assert json.loads(store.fs.cat(plan))["config"]["ray"]["address"] == "auto"
    # every model stage ran its cells on the worker node, the only one with CPUs
    assert {g["name"]: (g["cells_computed"], g["nodes"]) for g in m["generate"]} == {"a": (3, [worker]),
                                                                                   "b": (3, [worker])}
    assert {s["name"]: s["cells_computed"] for s in m["score"]} == {"judge": 6, "rm": 6, "exact": 6}
    assert all(s["nodes"] == [worker] for s in m["score"] if s["name"] != "exact")
    assert (m["embed"]["cells_computed"], m["embed"]["nodes"]) == (3, [worker])
    assert m["router_nodes"] == [worker]
    assert {a.node_id for a in train_workers} == {worker}
    assert m["label_rows"] == 12 and m["champion"]["decision"] == "promoted"
    # the same run as a local one: same cells (the local run computes none: each cell the cluster computed is
    # at the local run's own address), labels, router and evaluation (its router fitted without Ray Train workers)
    cells = lambda x: {(s["name"], s["fingerprint"]) for s in x["generate"] + x["score"]}  # noqa: E731
    assert cells(m) == cells(expected)
    stages = lambda x, key: {s["name"]: s[key] for s in x["generate"] + x["score"]}  # noqa: E731
    assert stages(expected, "cells_reused") == stages(m, "cells_computed")
    assert set(stages(expected, "cells_computed").values()) == {0}
    assert m["embed"]["fingerprint"] == expected["embed"]["fingerprint"]
    assert (expected["embed"]["cells_computed"], expected["embed"]["cells_reused"]) == (0, m["embed"]["cells_computed"])
    for key in ("labels", "router", "evaluation"):
        assert m[key] == expected[key], key
    print(f"cluster job test: {time.monotonic() - t0:.0f} s")
