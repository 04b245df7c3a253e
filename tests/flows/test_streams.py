"""The CLI as a Unix tool: results on stdout, everything else on stderr, one JSON document with --json (also on
failure), exit codes 0 ok / 1 internal error / 2 bad input / 3 store unavailable. Real processes where the
streams are the point (`python -m flows.cli`), the wrapper in-process where only the exit code is."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from flows.cli import JsonOpt, Result, command
from schemas.errors import InputError, StoreUnavailable

ROOT = Path(__file__).resolve().parents[2]


def zooter(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def python(code: str, *args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """A script that registers a command on zooter's app and runs the CLI entry point in a fresh process."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def one_json(stdout: str) -> dict:
    """stdout is exactly one JSON document (one line), nothing else."""
    assert stdout.endswith("\n") and stdout.count("\n") == 1, stdout
    return json.loads(stdout)


@pytest.fixture
def config(tmp_path) -> Path:
    """A valid config on fake model directories (a config.json is all `validate` reads)."""
    for name, arch in (("lm", "LlamaForCausalLM"), ("enc", "BertModel")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"architectures": [arch]}))
    # 12 queries: enough for the router's validation slice (preflight refuses fewer training queries)
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"text": f"What is {i} + {i}?"}) + "\n" for i in range(12)))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "store": str(tmp_path / "store"), "data": {"path": "q.jsonl"},
        "experts": [{"name": "a", "model": str(tmp_path / "lm")}],
        "reward_models": [{"name": "judge", "kind": "loglik", "model": str(tmp_path / "lm")}],
        "router": {"encoder": str(tmp_path / "enc")}}))
    return path


def test_validate_result_on_stdout(config):
    res = zooter("validate", str(config))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok: 1 experts, 1 reward models, 12 queries") and res.stdout.count("\n") == 1
    doc = one_json(zooter("validate", str(config), "--json").stdout)
    assert doc == {"config": str(config), "experts": ["a"], "reward_models": ["judge"], "queries": 12,
                   "store": str(config.parent / "store")}


def test_commands_that_load_no_model_import_no_torch():
    """`zooter validate` (preflight checks endpoints too), `experts` and the CLI itself load no model: importing
    torch and transformers would cost them ~8 s of start-up on 2 cores. Nor does importing the flows (`zooter
    serve`, `prefect deploy`): torch and Ray Train load when a router trains or is evaluated."""
    code = ("import sys, flows.cli, tasks.preflight, tasks.experts, flows.label, flows.deploy\n"
            "print(sorted({'torch', 'transformers', 'ray.train'} & set(sys.modules)))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_bad_input_exits_2_with_one_error_line_and_a_json_error(config):
    (config.parent / "q.jsonl").unlink()
    res = zooter("validate", str(config), "--json")
    assert res.returncode == 2
    err = one_json(res.stdout)["error"]
    assert err["type"] == "InputError" and err["exit_code"] == 2 and "data file not found" in err["message"]
    assert [line for line in res.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {err['message']}"]
    assert "Traceback" not in res.stderr
    plain = zooter("validate", str(config))
    assert plain.returncode == 2 and plain.stdout == "" and plain.stderr.startswith("error:")


def test_store_unavailable_exits_3(config):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = yaml.safe_load(config.read_text())
    raw["store"] = {"url": "s3://zooter/x", "retries": 0,
                    "options": {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"}}
    config.write_text(yaml.safe_dump(raw))
    res = zooter("validate", str(config), "--json")
    assert res.returncode == 3, res.stderr
    err = one_json(res.stdout)["error"]
    assert err["type"] == "StoreUnavailable" and err["exit_code"] == 3 and "unreachable" in err["message"]
    assert "error: s3://zooter/x: ls queries failed" in res.stderr


BUG = """
    import sys
    from flows.cli import JsonOpt, app, command, main

    @command(app)
    def bug(json_out: JsonOpt = False):
        print("working")  # not a result: goes to stderr
        raise ValueError("our own code is wrong")

    sys.argv = ["zooter", *sys.argv[1:]]
    main()
"""


def test_internal_error_exits_1_with_a_traceback():
    res = python(BUG, "bug", "--json")
    assert res.returncode == 1
    assert one_json(res.stdout) == {"error": {"message": "our own code is wrong", "type": "ValueError",
                                              "exit_code": 1}}
    assert "Traceback" in res.stderr and "ValueError: our own code is wrong" in res.stderr
    assert "working" in res.stderr and "error:" not in res.stderr  # a bug is not reported as bad input
    plain = python(BUG, "bug")
    assert plain.returncode == 1 and plain.stdout == "" and "Traceback" in plain.stderr


RAY = """
    import os, sys, time
    import ray
    from flows.cli import JsonOpt, Result, app, command, main

    @ray.remote
    def noisy(i):
        print(f"actor says {i}")  # forwarded to the driver's stdout by Ray's log monitor
        sys.stdout.flush()
        return i

    @command(app)
    def ray_noise(json_out: JsonOpt = False):
        ray.init(num_cpus=1, include_dashboard=False, _temp_dir=os.environ["RAY_TMPDIR"],
                 object_store_memory=100 * 1024**2)
        print("driver print")
        os.write(1, b"driver writes to fd 1\\n")  # C code and child processes write here
        total = sum(ray.get([noisy.remote(i) for i in range(3)]))
        time.sleep(2)  # the log monitor forwards the actors' lines meanwhile
        return Result({"sum": total}, lambda c: c.print(total))

    sys.argv = ["zooter", *sys.argv[1:]]
    main()
"""


def test_ray_actor_output_never_reaches_stdout():
    tmp = tempfile.mkdtemp(prefix="zr", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        res = python(RAY, "ray-noise", "--json", env={**os.environ, "RAY_TMPDIR": tmp})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert one_json(res.stdout) == {"sum": 3}
    assert "driver print" in res.stderr and "driver writes to fd 1" in res.stderr
    assert "actor says 0" in res.stderr


def test_exit_code_is_the_errors_in_process():
    app = typer.Typer()

    @command(app)
    def fail(kind: str, json_out: JsonOpt = False) -> Result:
        raise {"input": InputError("q.jsonl:3: malformed JSON"), "store": StoreUnavailable("s3://b: unreachable"),
               "bug": KeyError("k")}[kind]

    @command(app)
    def ok(json_out: JsonOpt = False) -> Result:
        return Result({"n": 1}, lambda c: c.print("n = 1"))

    runner = CliRunner()
    for kind, code in (("input", 2), ("store", 3), ("bug", 1)):
        res = runner.invoke(app, ["fail", kind, "--json"])
        assert res.exit_code == code
        assert json.loads(res.stdout)["error"]["exit_code"] == code
    assert isinstance(runner.invoke(app, ["fail", "bug"]).exception, KeyError)  # not swallowed
    res = runner.invoke(app, ["ok"])
    assert (res.exit_code, res.stdout, res.stderr) == (0, "n = 1\n", "")
    assert sys.stdout is not sys.stderr  # the in-process redirect was undone
