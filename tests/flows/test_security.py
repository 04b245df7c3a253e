"""Security: names cannot make store paths escape the store, and every server the project opens listens on
loopback only. (Secrets in artifacts, logs and error messages: tests/flows/test_s3.py.)"""

import contextlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from schemas.artifacts import generation_path, run_manifest_path, score_path
from schemas.config import ConfigError, load_config
from schemas.store import ArtifactError, Store

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()

BAD_NAMES = ["../evil", "/abs", "a/b", "s3://x", "..", ".", "a\\b", "%2e%2e", "", "a b", "~root", "a\x00b"]


def _edit(path: Path, fn) -> Path:
    cfg = yaml.safe_load(path.read_text())
    fn(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _clean_failure(res) -> None:
    """Nonzero exit through `zooter`'s own error line: no traceback, no escaped exception."""
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and res.output.startswith("error:"), res.output


# --- names become path components: the config refuses any that is not a plain name -------------------------

@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("key", ["experts", "reward_models"])
def test_config_rejects_path_like_names(tiny_config, key, name):
    path = _edit(tiny_config(), lambda c: c[key][0].update(name=name))
    with pytest.raises(ConfigError, match=rf"{key}\.0\.name: .*must match"):
        load_config(path)


def test_cli_run_rejects_path_like_expert_name(tiny_config):
    path = _edit(tiny_config(), lambda c: c["experts"][0].update(name="../evil"))
    store = yaml.safe_load(path.read_text())["store"]
    res = runner.invoke(app, ["run", str(path)])
    _clean_failure(res)
    assert res.exit_code == 2 and "experts.0.name" in res.output
    assert not os.path.exists(store)


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/b", "s3://x", "..", "a\\b", "%2e%2e"])
def test_experts_add_and_remove_reject_bad_names(tiny_config, tiny_models, name):
    path = tiny_config()
    before = path.read_text()
    res = runner.invoke(app, ["experts", "add", str(path), "--name", name, "--model", str(tiny_models["lm_a"])])
    _clean_failure(res)
    assert "name" in res.output
    res = runner.invoke(app, ["experts", "remove", str(path), "--name", name])
    _clean_failure(res)
    assert path.read_text() == before  # the config is untouched
    assert not list(path.parent.glob(".config.yaml.*"))


def _fake_run(store: Path, run_id: str = "20260101T000000Z-000000") -> None:
    m = {"run_id": run_id, "flow": "label", "config": {}, "status": "completed", "started": "2026-01-01T00:00:00+00:00",
         "queries": 0, "generate": [], "score": [], "labels": None, "router": None, "timings": {"total_s": 1.0},
         "shards": []}
    Store(str(store)).write_json(run_manifest_path(run_id), m)


@pytest.mark.parametrize("run_id", ["../../etc", "../x", "/etc", "..", "a/../../b", "%2e%2e"])
def test_inspect_run_cannot_leave_the_store(tmp_path, run_id):
    store = tmp_path / "store"
    _fake_run(store)
    # a manifest-shaped file outside the store, where "../x" would land if the run id were used as a path
    outside = tmp_path / "x"
    outside.mkdir()
    (outside / "manifest.json").write_text((store / "runs").glob("*/manifest.json").__next__().read_text())
    res = runner.invoke(app, ["inspect", str(store), "--run", run_id])
    _clean_failure(res)
    assert res.exit_code == 2 and "--run" in res.output


def test_inspect_empty_store_fails_cleanly(tmp_path):
    res = runner.invoke(app, ["inspect", str(tmp_path / "nothing"), "--run", "../../etc"])
    _clean_failure(res)


@pytest.mark.parametrize("expert", ["../evil", "/abs"])
def test_import_scores_expert_names_cannot_leave_the_store(tmp_path, expert):
    table = tmp_path / "scores.jsonl"
    table.write_text(json.dumps({"query": "What is 2 + 3?", "expert": expert, "score": 1.0}) + "\n")
    store = tmp_path / "a" / "store"
    res = runner.invoke(app, ["import-scores", str(table), "--store", str(store)])
    _clean_failure(res)
    assert f"expert {expert!r}: each '/'-separated part must match" in " ".join(res.output.split())
    assert not (tmp_path / "a").exists()  # checked before anything is written
    assert not (tmp_path / "evil-").exists() and not list(tmp_path.glob("**/evil-*"))


def test_import_scores_rejects_path_like_import_name(tmp_path):
    table = tmp_path / "scores.jsonl"
    table.write_text(json.dumps({"query": "q", "expert": "a", "score": 1.0}) + "\n")
    res = runner.invoke(app, ["import-scores", str(table), "--store", str(tmp_path / "s"), "--name", "../x"])
    _clean_failure(res)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("rel", ["../other-bucket/x", "/other-bucket/x", "s3://other-bucket/x", "..",
                                 "generations/../../../other-bucket/x", "a//b"])
def test_s3_store_paths_stay_in_their_bucket(rel):
    # no request is made: the filesystem object is built, paths are only joined
    store = Store("s3://zooter/runs-a", {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"})
    with pytest.raises(ArtifactError, match="unsafe store path"):
        store.path(rel)


def test_s3_store_paths_of_valid_names_stay_under_the_prefix():
    store = Store("s3://zooter/runs-a", {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"})
    for name in ["a", "qwen2.5-coder", "A_1.b-c", "x" * 64]:
        for rel in (generation_path(name, "f" * 12, 0), score_path(name, "e" * 12, name, "d" * 12, 3)):
            assert store.path(rel).startswith("zooter/runs-a/"), rel
    # a name the config refuses would also be refused by the store, or stay inside it
    for name in BAD_NAMES:
        try:
            p = store.path(generation_path(name, "f" * 12, 0))
        except ArtifactError:
            continue
        assert p.startswith("zooter/runs-a/generations/"), (name, p)


# --- servers listen on loopback ------------------------------------------------------------------------------

def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_loopback_helper():
    assert all(map(_loopback, ["127.0.0.1", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(_loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:10.0.0.1"]))


# Starts embedded Ray exactly as the flow does (`connect(RayConfig())`), runs a task so that a worker and the
# agents are up, then lists every listening TCP socket of this process and all its children.
RAY_SCRIPT = r"""
import json, time
import psutil
import ray
from cluster.pool import connect
from schemas.config import RayConfig

connect(RayConfig(num_cpus=1, dashboard=True))  # with everything it can start: the dashboard too

@ray.remote
def one():
    return 1

assert ray.get(one.remote(), timeout=120) == 1
found, deadline = {}, time.monotonic() + 20
while True:
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            name = f"{p.name()} {' '.join(p.cmdline()[:2])[-60:]}"
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found[f"{c.laddr.ip} {c.laddr.port}"] = name
        except psutil.Error:
            pass
    names = " ".join(found.values())
    if all(n in names for n in ("DashboardAgent", "RuntimeEnvAgent", "dashboard.py")) or time.monotonic() > deadline:
        break
    time.sleep(1)
print("RESULT " + json.dumps(found))
ray.shutdown()
"""


@pytest.mark.slow
def test_embedded_ray_listens_on_loopback_only():
    # Ray's unix socket paths (at most 107 bytes) live under its temp dir: a short one, not pytest's
    with tempfile.TemporaryDirectory(prefix="zrayl-") as tmp:
        env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run([sys.executable, "-c", RAY_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert list(Path(tmp).glob("ray/session_*")), "Ray did not use the test's temp dir"
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    found = json.loads(line.removeprefix("RESULT "))
    names = " ".join(found.values())
    assert "gcs_server" in names and "raylet" in names and "dashboard.py" in names, found  # seen, not missed
    exposed = {addr: who for addr, who in found.items() if not _loopback(addr.split()[0])}
    assert not exposed, f"embedded Ray listens beyond loopback: {exposed}"


@pytest.mark.slow
def test_prefect_temporary_api_listens_on_loopback(prefect_harness):
    from prefect.settings import PREFECT_API_URL

    url = urlparse(PREFECT_API_URL.value())
    assert _loopback(socket.gethostbyname(url.hostname)), url
    me = psutil.Process()
    listening = []
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            listening += [(c.laddr.ip, p.pid) for c in p.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN and c.laddr.port == url.port]
    assert listening and all(_loopback(ip) for ip, _ in listening), listening


def test_serve_opens_no_webserver_beyond_loopback(tiny_config, monkeypatch):
    """`zooter serve` (flows/deploy.py) starts Prefect's runner without a webserver; if one is enabled by setting,
    its host defaults to localhost."""
    from prefect.settings import PREFECT_RUNNER_SERVER_ENABLE, PREFECT_RUNNER_SERVER_HOST
    from prefect.settings.models.runner import RunnerServerSettings

    import flows.deploy as deploy

    calls = []
    monkeypatch.setattr(deploy, "serve", lambda *deps, **kw: calls.append((deps, kw)))
    deploy.serve_deployments(str(tiny_config()), "0 3 * * *", 2)
    ((deps, kw),) = calls
    assert len(deps) == 2 and not kw.get("webserver"), kw
    assert RunnerServerSettings.model_fields["enable"].default is False
    assert RunnerServerSettings.model_fields["host"].default == "localhost"
    if "PREFECT_RUNNER_SERVER_ENABLE" not in os.environ and "PREFECT_RUNNER_SERVER_HOST" not in os.environ:
        assert PREFECT_RUNNER_SERVER_ENABLE.value() is False
        infos = socket.getaddrinfo(PREFECT_RUNNER_SERVER_HOST.value(), None)
        assert infos and all(_loopback(i[4][0]) for i in infos), infos


def test_cli_tracebacks_show_no_locals():
    """An unexpected error in `zooter run` prints Typer's traceback: without the frames' local variables, which
    hold the loaded config and its store.options (S3 key and secret)."""
    assert app.pretty_exceptions_show_locals is False
