"""Deployments: prefect.yaml, `zooter experts add|remove|list`, the relabel deployment's one-run-at-a-time limit
(on the session's Prefect API), and the served relabel deployment triggered by the `zooter.experts.changed` event on
a real Prefect server (`prefect server start` on 127.0.0.1)."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLimitStrategy, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.events import DeploymentEventTrigger
from prefect.flows import load_flow_from_entrypoint
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from flows.cli import app
from schemas.config import load_config
from schemas.traffic import EVENT as TRAFFIC_EVENT
from tasks.experts import CURRENT, EVENT, published

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_prefect_yaml_declares_both_deployments():
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in doc["deployments"]}
    assert sorted(deps) == ["label", "relabel"]
    assert load_flow_from_entrypoint(str(ROOT / deps["label"]["entrypoint"])).name == "zooter-label"
    assert load_flow_from_entrypoint(str(ROOT / deps["relabel"]["entrypoint"])).name == "zooter-relabel"
    relabel = deps["relabel"]
    # the config is a URL the worker reads at run time, never a path from the deploying shell
    assert deps["label"]["parameters"] == relabel["parameters"] == {"config_path": "{{ $ZOOTER_CONFIG_URL }}"}
    assert relabel["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert [s["cron"] for s in relabel["schedules"]] == ["0 3 * * *"]
    pool, traffic = (DeploymentEventTrigger.model_validate({k: v for k, v in t.items() if k != "type"})
                     for t in relabel["triggers"])
    assert pool.expect == {EVENT} and pool.parameters == {"config_path": "{{ event.payload.config_url }}"}
    assert traffic.expect == {TRAFFIC_EVENT} and traffic.match == pool.match
    assert traffic.parameters == {"config_path": "{{ event.payload.config_url }}", "traffic": True}


def test_served_deployments(tiny_config):
    from flows.deploy import deployments

    path = tiny_config()
    label, relabel = deployments(str(path))
    assert (label.name, label.flow_name, relabel.name, relabel.flow_name) == (
        "label", "zooter-label", "relabel", "zooter-relabel")
    assert label.parameters == relabel.parameters == {"config_path": str(path)}
    assert [s.schedule.cron for s in relabel.schedules] == ["0 3 * * *"] and not label.schedules
    assert relabel.concurrency_limit == 1 and label.concurrency_limit is None
    assert relabel.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    trigger, traffic = relabel.triggers
    store = yaml.safe_load(path.read_text())["store"]
    assert trigger.expect == {EVENT} and trigger.match.get("prefect.resource.id") == [f"zooter.store.{store}"]
    assert trigger.parameters == {"config_path": "{{ event.payload.config_url }}"}
    assert traffic.expect == {TRAFFIC_EVENT} and traffic.match == trigger.match
    assert traffic.parameters == {"config_path": "{{ event.payload.config_url }}", "traffic": True}


def test_relabel_runs_one_at_a_time(tiny_config, prefect_harness):
    """The served relabel deployment as the API stores it: limit 1, ENQUEUE. Two runs created at once: the second
    one asking to start while the first runs is put back to wait (AwaitingConcurrencySlot), and starts after it."""
    from prefect.states import Completed, Pending, Running

    from flows.deploy import deployments

    _, relabel = deployments(str(tiny_config()), cron=None)
    dep_id = relabel.apply()
    with get_client(sync_client=True) as client:
        dep = client.read_deployment(dep_id)
        assert dep.global_concurrency_limit.limit == 1
        assert dep.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
        first, second = (client.create_flow_run_from_deployment(dep_id) for _ in range(2))
        assert client.set_flow_run_state(first.id, Pending()).status == SetStateStatus.ACCEPT
        client.set_flow_run_state(first.id, Running())
        waits = client.set_flow_run_state(second.id, Pending())
        assert waits.status == SetStateStatus.REJECT
        assert (waits.state.type, waits.state.name) == (StateType.SCHEDULED, "AwaitingConcurrencySlot")
        client.set_flow_run_state(first.id, Completed())  # frees the slot
        assert client.set_flow_run_state(second.id, Pending()).status == SetStateStatus.ACCEPT


def test_experts_add_remove_list_without_a_prefect_api(tiny_config, tiny_models):
    path = tiny_config()
    before = path.read_text()
    # an API URL that nothing listens on: the pool is still edited, the event is skipped with a warning
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        res = runner.invoke(app, ["experts", "add", str(path), "--name", "c", "--model", str(tiny_models["lm_b"]),
                                  "--dtype", "float32", "--max-new-tokens", "4", "--pool-size", "2"])
        assert res.exit_code == 0, res.output
        assert "warning" in res.output and f"{EVENT} not emitted" in res.output
        experts = yaml.safe_load(path.read_text())["experts"]
        assert [e["name"] for e in experts] == ["a", "b", "c"]
        assert experts[2] == {"name": "c", "model": str(tiny_models["lm_b"]), "dtype": "float32",
                              "sampling": {"max_new_tokens": 4}, "resources": {"pool_size": 2}}
        listed = runner.invoke(app, ["experts", "list", str(path)])
        assert listed.exit_code == 0 and all(n in listed.output for n in ("a", "b", "c"))

        # invalid additions and removals fail with one line and leave the file as it was
        edited = path.read_text()
        for args in (["add", str(path), "--name", "c", "--model", "x"],
                     ["add", str(path), "--name", "bad/name", "--model", "x"],
                     ["add", str(path), "--name", "d", "--model", "x", "--dtype", "int3"],
                     ["remove", str(path), "--name", "nope"]):
            res = runner.invoke(app, ["experts", *args])
            # a bad --dtype is refused by the option's typed choices (click's usage error), the rest by us
            said = "Invalid value for '--dtype'" in res.output or res.output.count("error:") == 1
            assert res.exit_code == 2 and said, res.output
            assert path.read_text() == edited
        for name in ("c", "b"):
            assert runner.invoke(app, ["experts", "remove", str(path), "--name", name]).exit_code == 0
        last = runner.invoke(app, ["experts", "remove", str(path), "--name", "a"])
        assert last.exit_code == 2 and "at least one expert" in last.output
    assert yaml.safe_load(path.read_text())["experts"] == yaml.safe_load(before)["experts"][:1]
    assert not list(path.parent.glob(".config.yaml.*"))  # no temp files left behind


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, limit: float, procs: list[subprocess.Popen]):
    """Poll `check` until it returns a truthy value; fail (with the processes' logs) past `limit` seconds or
    when a process died."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{p.args} exited with {p.returncode} while waiting for {what}"
        try:
            got = check()
        except (httpx.HTTPError, OSError):
            got = None
        if got:
            return got
        time.sleep(0.5)
    pytest.fail(f"gave up waiting for {what} after {limit:.0f}s")


@pytest.mark.slow
def test_experts_add_event_triggers_served_relabel(tmp_path, tiny_models, labeled):
    from tests.conftest import copy_labeled, tiny_router

    # a store labelled with experts a and b; the triggered run fits its router on the tiny encoder (not checked here)
    path = copy_labeled(labeled, tmp_path, tiny_models, router=tiny_router(tiny_models))
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_LOGGING_LEVEL": "INFO",
           # the served process looks for runs to start every 10 s by default: the triggered run starts sooner
           "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="zray-")}  # the served run's Ray: short socket paths, not /tmp/ray
    logs = {n: open(tmp_path / f"{n}.log", "w") for n in ("server", "serve", "add")}  # noqa: SIM115
    procs: list[subprocess.Popen] = []
    try:
        # a real server with all its services (triggers and actions evaluate the automation)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=logs["server"], stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True))
        _wait(lambda: httpx.get(f"{api}/health", timeout=5).status_code == 200, "the Prefect server", 180, procs)
        procs.append(subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(path)], env=env,
                                      stdout=logs["serve"], stderr=subprocess.STDOUT, cwd=ROOT,
                                      start_new_session=True))

        def relabel_deployment():
            r = httpx.get(f"{api}/deployments/name/zooter-relabel/relabel", timeout=5)
            return r.json() if r.status_code == 200 else None

        dep = _wait(relabel_deployment, "the served relabel deployment", 180, procs)

        def automation():
            r = httpx.post(f"{api}/automations/filter", json={}, timeout=5)
            return [a for a in r.json() if a["name"] == "relabel on expert pool change"]

        (auto,) = _wait(automation, "the relabel trigger's automation", 60, procs)
        # on SQLite the server loads a new automation into its triggers service right after the commit
        assert auto["trigger"]["expect"] == [EVENT]

        add = subprocess.run([sys.executable, "-m", "flows.cli", "experts", "add", str(path), "--name", "c",
                              "--model", str(tiny_models["lm_b"]), "--dtype", "float32", "--prompt", "fewshot_qa",
                              "--max-new-tokens", "6"], env=env, stdout=logs["add"], stderr=subprocess.STDOUT,
                             cwd=ROOT, timeout=300)
        out = (tmp_path / "add.log").read_text()
        assert add.returncode == 0 and f"emitted {EVENT}" in out, out

        def finished_run():
            r = httpx.post(f"{api}/flow_runs/filter", timeout=5,
                           json={"deployments": {"id": {"any_": [dep["id"]]}}})
            runs = r.json()
            done = [fr for fr in runs if fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
            return done or None

        (run,) = _wait(finished_run, "the triggered relabel run", 900, procs)
        assert run["state"]["type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-5000:]
        # the run got the edited config's copy in the store (content-addressed), not the editor's file
        data = published(load_config(path))
        (copy,) = [p for p in (tmp_path / "store" / "configs").iterdir() if p.name != "current.yaml"]
        assert run["parameters"] == {"config_path": str(copy)} and copy.read_bytes() == data
        assert (tmp_path / "store" / CURRENT).read_bytes() == data
        # the run relabelled the store with the new pool: only expert c's cells were missing
        manifests = [yaml.safe_load(p.read_text()) for p in (tmp_path / "store" / "runs").glob("*/manifest.json")]
        (m,) = [m for m in manifests if m["run_id"] != labeled.outcome.manifest.run_id]
        assert m["flow"] == "relabel" and m["status"] == "completed"
        assert {g["name"]: g["cells_computed"] for g in m["generate"]} == {"a": 0, "b": 0, "c": 3}
        assert {s["name"]: s["cells_computed"] for s in m["score"]} == {"judge": 3, "rm": 3, "exact": 3}
        assert sum(s["cells_reused"] for s in m["generate"] + m["score"]) == 6 + 18

        # prefect.yaml deploys to the same server (a process work pool; nothing runs without a worker)
        procs[1].send_signal(signal.SIGTERM)
        procs[1].wait(timeout=60)
        current = str(tmp_path / "store" / CURRENT)  # the published config's fixed key (a local store here)
        yenv = {**env, "ZOOTER_HOME": str(ROOT), "ZOOTER_CONFIG_URL": current}
        for cmd in (["work-pool", "create", "zooter", "--type", "process"], ["deploy", "--all"]):
            r = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *cmd], env=yenv, cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        dep = relabel_deployment()
        assert dep["work_pool_name"] == "zooter" and dep["parameters"] == {"config_path": current}
        assert dep["global_concurrency_limit"]["limit"] == 1
        assert dep["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
        deployed = [a for a in automation() if a["actions"][0].get("deployment_id") == dep["id"]]
        assert len(deployed) == 1 and deployed[0]["trigger"]["match"] == {"prefect.resource.id": "zooter.store.*"}
    finally:
        # each process leads its own session: its flow-run subprocesses and Ray workers stop with it
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for f in logs.values():
            f.close()
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
