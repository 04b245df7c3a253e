"""`connect`: embedded Ray (`ray.address: null`) is this process's own private instance, even when another Ray runs
on the machine and RAY_ADDRESS points at it (ray.init's default would attach to that one); joining a running cluster
from inside a submitted Ray job keeps the job's runtime env and the cluster's resources."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh process: connect, then report which Ray it got and which Ray its workers would look up.
PROBE = """
import json, os, psutil, ray
from ray._private.services import canonicalize_bootstrap_address_or_die
from cluster.pool import connect
from schemas.config import RayConfig

connect(RayConfig(num_cpus=1))
ctx = ray.get_runtime_context()
seen = ray.get(ray.remote(lambda: canonicalize_bootstrap_address_or_die(None)).options(num_cpus=0).remote())
# the dashboard's module processes (ray-dashboard-JobHead-0, ...); without the dashboard Ray keeps a minimal head
dashboard = any(p.name().startswith("ray-dashboard-") for p in psutil.Process().children(recursive=True))
print(json.dumps({"gcs": ctx.gcs_address, "node": ctx.get_node_id(), "nodes": len(ray.nodes()),
                  "workers_see": seen, "dashboard": dashboard}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Joins the running cluster as the driver of a submitted job does: RAY_ADDRESS and the job's config (its runtime env)
# in the environment, as Ray's job supervisor sets them, and the job's env_vars already in force.
JOIN = """
import json, os, ray
from cluster.pool import alive_nodes, connect
from schemas.config import RayConfig

connect(RayConfig(address="auto"))
names = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "ZOOTER_CACHE", "ZOOTER_JOB")
seen = ray.get(ray.remote(lambda: {k: os.environ.get(k) for k in names}).options(num_cpus=0).remote())
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "cpus": ray.cluster_resources()["CPU"],
                  "object_store": ray.cluster_resources()["object_store_memory"], "nodes": alive_nodes(),
                  "workers_see": seen}))
"""
JOB_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true", "ZOOTER_JOB": "yes"}


@pytest.fixture(scope="module")
def other_ray():
    """A second Ray started with `ray start --head` (its own temp dir, loopback, a free port); yields its GCS
    address. Stopped afterwards by the ids of the processes it started, never `ray stop` (which would stop every
    Ray on the machine)."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="zr", dir="/tmp")  # short: Ray's socket paths have a length limit
    # Token auth off, explicitly: `ray start` turns it on when ~/.ray holds a token, and a driver that is not its
    # child (as a job's driver is) would not know.
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
         f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(c.name().startswith("gcs_server") for c in psutil.Process(head.pid).children(recursive=True)):
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        procs = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=5)  # some of Ray's processes ignore SIGTERM: don't wait long
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(temp, ignore_errors=True)


def test_embedded_ray_is_private_when_another_ray_runs(other_ray):
    env = os.environ | {"RAY_ADDRESS": other_ray, "RAY_USAGE_STATS_ENABLED": "0"}
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["gcs"] != other_ray and got["gcs"].startswith("127.0.0.1:")
    assert got["nodes"] == 1  # its own single node, not a node joined to the other Ray
    assert got["workers_see"] == got["gcs"]  # Ray Train's helpers look up this Ray, not "multiple instances"
    assert got["dashboard"] is False  # `ray.dashboard` is off by default (tests/flows/test_security.py turns it on)


def test_a_submitted_job_joins_with_its_own_runtime_env_and_the_clusters_resources(other_ray):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job = {"runtime_env": {"env_vars": JOB_ENV}, "metadata": {}}
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: a driver on Linux otherwise turns the loopback address it joins into the
    # host's IP, where this loopback-only cluster does not listen.
    env = os.environ | JOB_ENV | {"RAY_ADDRESS": other_ray, "RAY_USAGE_STATS_ENABLED": "0",
                                  "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                                  RAY_JOB_CONFIG_JSON_ENV_VAR: json.dumps(job)}
    res = subprocess.run([sys.executable, "-c", JOIN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]  # Ray refuses a driver runtime env that names a job's env var
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["gcs"] == other_ray and got["cpus"] == 1 and got["nodes"] == 1  # the cluster's, not a new Ray's
    assert got["object_store"] != 512 * 1024**2  # embedded Ray's size was not asked of the cluster
    # the job's values win; ours fill in what the job does not set
    assert got["workers_see"] == JOB_ENV | {"ZOOTER_CACHE": os.environ["ZOOTER_CACHE"]}


def test_worker_env_leaves_out_what_the_jobs_runtime_env_sets(monkeypatch):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from cluster.pool import worker_env

    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    monkeypatch.setenv("ZOOTER_CACHE", "/cache")
    for name in ("TOKENIZERS_PARALLELISM", "TRANSFORMERS_OFFLINE", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.delenv(name)
    outside = worker_env()
    assert outside == {"HF_HUB_OFFLINE": "1", "ZOOTER_CACHE": "/cache", "TOKENIZERS_PARALLELISM": "false"}
    job_env = {"working_dir": "gcs://_ray_pkg_x.zip", "env_vars": {"ZOOTER_CACHE": "/job", "HF_HUB_OFFLINE": "1"}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": job_env, "metadata": {}}))
    inside = worker_env()
    assert inside == {"TOKENIZERS_PARALLELISM": "false"}
    assert _merge_runtime_env(job_env, {"env_vars": outside}) is None  # what Ray refuses (ray.init raises)
    assert _merge_runtime_env(job_env, {"env_vars": inside}) == {**job_env, "env_vars": job_env["env_vars"] | inside}
