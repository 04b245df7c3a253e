"""The label flow against a two-node Ray cluster joined by address, and the cluster launch files.

The cluster runs in a subprocess: the test session already has its own local Ray (`ray_session`), and one
process can be connected to one Ray cluster only.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from schemas.config import ALLOW_SYNTHETIC
from tests.conftest import synthetic_models, tiny_flow_config, tiny_router

ROOT = Path(__file__).resolve().parents[2]

# Head and worker node with one CPU each. Experts a (pool of 2, SPREAD) and b generate at the same time and the reward
# models score what is generated: between them they use both nodes; a's second actor gets cells only once placed, so
# a never waits for b (the pools cannot deadlock on the two CPUs).
SCRIPT = r"""
import json, sys
import yaml
from ray.cluster_utils import Cluster

config, local_config, temp_dir = sys.argv[1], sys.argv[2], sys.argv[3]
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "object_store_memory": 150 * 1024**2, "include_dashboard": False, "temp_dir": temp_dir})
cluster.add_node(num_cpus=1, object_store_memory=150 * 1024**2)
cluster.wait_for_nodes()
try:
    import ray
    for path in (config, local_config):
        cfg = yaml.safe_load(open(path))
        cfg["ray"] = {"address": cluster.address}
        open(path, "w").write(yaml.safe_dump(cfg))
    from flows.label import label_flow
    from schemas.errors import ConfigError
    try:  # a local-path store on two nodes: refused before anything is written
        label_flow(local_config)
        refused = None
    except ConfigError as e:
        refused = str(e)
    ray.shutdown()
    out = label_flow(config)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    print("RESULT " + json.dumps({"nodes": nodes, "manifest": out.manifest.model_dump(mode="json"),
                              "refused": refused}))
finally:
    import ray
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
def test_label_flow_on_a_two_node_cluster(tmp_path, tiny_models, s3_server, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    res = {"num_cpus": 1, "batch_size": 4, "threads": 1}
    (tmp_path / "local").mkdir()
    local = tiny_flow_config(tmp_path / "local", tiny_models)
    # the router is fitted on the tiny encoder: what is checked here is where the cells were computed
    path = tiny_flow_config(tmp_path, tiny_models, store={"url": "s3://zooter/two-node", "options": s3_server},
                            router=tiny_router(tiny_models))
    cfg = yaml.safe_load(path.read_text())
    cfg["experts"][0]["resources"] = {**res, "pool_size": 2}
    synthetic_models(cfg)  # placement is the point; real models on a cluster are tests/flows/test_cluster_job.py's
    path.write_text(yaml.safe_dump(cfg))
    # the session's Prefect API (a temporary one per process costs a server start-up; the job test keeps that)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": PREFECT_API_URL.value(), ALLOW_SYNTHETIC: "1"}
    # Ray's socket paths must stay under 107 bytes: a short temp dir, not pytest's
    with tempfile.TemporaryDirectory(prefix="zray-") as ray_tmp:
        # Ray's Cluster util records its address under $RAY_TMPDIR/ray: keep that in the temp dir too
        os.makedirs(os.path.join(ray_tmp, "ray"))
        env["RAY_TMPDIR"] = ray_tmp
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(local), ray_tmp], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=1200)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(line.removeprefix("RESULT "))
    m = out["manifest"]
    assert out["refused"] and out["refused"].startswith("store.url: ") and "2 alive nodes" in out["refused"]
    assert not (tmp_path / "local" / "store").exists()  # refused before anything was written
    assert len(out["nodes"]) == 2 and m["status"] == "completed"
    gen = {g["name"]: g for g in m["generate"]}
    assert (gen["a"]["cells_computed"], gen["b"]["cells_computed"]) == (3, 3)
    # model work on both nodes: usually the two experts' pools side by side; when a reward model takes the second
    # CPU as soon as a's first cell exists (pipelined), b waits and then runs where a ran (seen once in a full run)
    worked = {n for st in m["generate"] + m["score"] for n in st.get("nodes") or []}
    assert worked == set(out["nodes"])
    assert len(gen["b"]["nodes"]) == 1 and set(gen["a"]["nodes"]) <= set(out["nodes"])
    assert {s["name"]: s["cells_computed"] for s in m["score"]} == {"judge": 6, "rm": 6, "exact": 6}
    assert m["champion"]["decision"] == "promoted" and m["label_rows"] == 12


def test_cluster_launch_files():
    """The shipped launcher and RayJob files: dashboards not on an open port, the job runs examples/cluster.yaml
    (which validates and joins the cluster with an S3 store), and the job's runtime env carries code and offline env."""
    from schemas.config import load_config

    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    assert launcher["cluster_name"] == "zooter" and launcher["provider"]["type"] == "local"
    assert any("make install" in c for c in launcher["setup_commands"])
    [head_start] = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start

    job = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == "zooter run examples/cluster.yaml"
    # KubeRay's operator reads job status through the head Service, so the dashboard stays on the pod network
    # (KubeRay's default, never 0.0.0.0 spelled out here) behind a token; the submitter runs in the head pod.
    cluster = spec["rayClusterSpec"]
    assert "dashboard-host" not in cluster["headGroupSpec"]["rayStartParams"]
    assert cluster["authOptions"] == {"mode": "token"} and spec["submissionMode"] == "SidecarMode"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip") and runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert cluster["rayVersion"] == "2.60.0" and cluster["workerGroupSpecs"][0]["replicas"] == 2

    cfg = load_config(ROOT / "examples" / "cluster.yaml")
    assert cfg.ray.address == "auto" and cfg.store.url.startswith("s3://")
    assert all(m.startswith("packaged:") for m in [*(e.model for e in cfg.experts), cfg.router.encoder])
    assert Path(cfg.data.path).is_file()  # it travels in the working_dir
