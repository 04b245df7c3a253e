"""Embedded Ray (`ray.address: null`) is this process's own private instance, even when another Ray runs on the
machine and RAY_ADDRESS points at it (ray.init's default would attach to that one)."""

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
import json, os, ray
from ray._private.services import canonicalize_bootstrap_address_or_die
from cluster.pool import connect
from schemas.config import RayConfig

connect(RayConfig(num_cpus=1))
ctx = ray.get_runtime_context()
seen = ray.get(ray.remote(lambda: canonicalize_bootstrap_address_or_die(None)).options(num_cpus=0).remote())
print(json.dumps({"gcs": ctx.gcs_address, "node": ctx.get_node_id(), "nodes": len(ray.nodes()),
                  "workers_see": seen}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def other_ray():
    """A second Ray started with `ray start --head` (its own temp dir, loopback, a free port); yields its GCS
    address. Stopped afterwards by the ids of the processes it started, never `ray stop` (which would stop every
    Ray on the machine)."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="zr", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
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
