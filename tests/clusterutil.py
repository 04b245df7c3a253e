"""A two-node Ray cluster on one machine whose nodes share no disk, for tests of submitted jobs.

The head (`ray start --head --num-cpus=0`) offers no CPUs, so every task and actor that needs one runs on the
worker node. The worker runs in its own mount namespace (`unshare --mount`, as root): private tmpfs mounts hide
the checkout, the head's Ray temp dir and every path the test names, while the virtualenv and the model cache are
bound back in, as a cluster image would carry them. Everything binds 127.0.0.1.

`ray stop` is never used: it stops every Ray on the machine, the test session's own included. The cluster's
processes are started in their own sessions and ended by process group (and by pid, for any that left it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
HOST = "127.0.0.1"
# Ray's token authentication (on by default since 2.52; the token is ~/.ray/auth_token, which both nodes see).
# Clients in this process (state API, job submission) send the token only in this mode.
AUTH = {"RAY_AUTH_MODE": "token"}

# The worker's mount namespace. Mounts are made private first so nothing propagates back to the host; the kept
# paths are bound to a staging dir before the tmpfs mounts hide them, then bound back at their own paths.
WORKER_SHELL = r"""
set -eu
mount --make-rprivate /
i=0
for p in $KEEP; do mkdir -p "$STAGE/$i"; mount --bind "$p" "$STAGE/$i"; i=$((i+1)); done
for p in $HIDE; do mount -t tmpfs -o size=512m zooter-hidden "$p"; done
i=0
for p in $KEEP; do mkdir -p "$p"; mount --bind "$STAGE/$i" "$p"; i=$((i+1)); done
exec "$@"
"""

# Run inside a driver joined to the cluster: which of the given paths each node sees (a zero-CPU task pinned to
# the node, so it also runs on the CPU-less head), and which node is the head.
PROBE = r"""
import json, os, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

paths = json.loads(sys.argv[2])
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=0)
def seen(paths):
    return {p: os.path.exists(p) for p in paths}

alive = [n for n in ray.nodes() if n["Alive"]]
refs = {n["NodeID"]: seen.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
        .remote(paths) for n in alive}
head = [n["NodeID"] for n in alive if "node:__internal_head__" in n["Resources"]]
print("PROBE " + json.dumps({"head": head[0], "cpus": {n["NodeID"]: n["Resources"].get("CPU", 0) for n in alive},
                            "seen": {k: ray.get(r) for k, r in refs.items()}}))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class NoSharedDiskCluster:
    """A head node with no CPUs and one isolated worker node; use as a context manager.

    `env`: extra environment of both nodes (store endpoint and credentials, offline switches). `hide`: paths
    the worker must not see besides the checkout and the head's temp dir. `keep`: paths under those it must see
    (besides the virtualenv)."""

    env: dict[str, str]
    hide: Sequence[Path] = ()
    keep: Sequence[Path] = ()
    worker_cpus: int = 2
    base: Path = field(init=False)
    gcs: str = field(init=False)
    dashboard: str = field(init=False)
    _procs: list[subprocess.Popen] = field(init=False, default_factory=list)
    _pids: set[int] = field(init=False, default_factory=set)

    def __enter__(self) -> NoSharedDiskCluster:
        # Ray's socket paths must stay under 107 bytes: a short base dir, not pytest's
        self.base = Path(tempfile.mkdtemp(prefix="zc-", dir="/tmp"))
        for d in ("head", "worker", "stage"):
            (self.base / d).mkdir()
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self.env, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}", **AUTH}
        # nothing of the test session's own Ray or Prefect leaks into the cluster's processes
        for k in ("RAY_ADDRESS", "PREFECT_API_URL", "PYTHONPATH"):
            env.pop(k, None)
        return env

    def _popen(self, args: list[str], log: str, **env: str) -> subprocess.Popen:
        with open(self.base / log, "wb") as out:
            p = subprocess.Popen(args, env={**self._env(), **env}, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True, cwd=self.base)
        self._procs.append(p)
        return p

    def _start(self) -> None:
        port, dash = free_port(), free_port()
        self.gcs, self.dashboard = f"{HOST}:{port}", f"http://{HOST}:{dash}"
        ray = str(VENV / "bin" / "ray")
        common = ["--node-ip-address", HOST, "--object-store-memory", str(200 * 1024**2), "--disable-usage-stats",
                  "--dashboard-agent-listen-port", str(free_port()), "--block"]
        self._popen([ray, "start", "--head", "--num-cpus=0", f"--port={port}", "--dashboard-host", HOST,
                     f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
                     f"--temp-dir={self.base / 'head'}", *common], "head.log")
        self._wait_for(1)
        hide = [ROOT, self.base / "head", *self.hide]
        keep = [VENV, *self.keep]
        # A worker node takes the head's temp dir unless given its own (ray/_private/node.py `_init_temp`)
        start = [ray, "start", f"--address={self.gcs}", f"--num-cpus={self.worker_cpus}",
                 f"--temp-dir={self.base / 'worker'}", *common]
        # paths go through the shell unquoted: none may hold a space
        assert not any(" " in str(p) for p in [*keep, *hide]), (keep, hide)
        self._popen(["unshare", "--mount", "--", "sh", "-c", WORKER_SHELL, "worker", *start], "worker.log",
                    KEEP=" ".join(map(str, keep)), HIDE=" ".join(map(str, hide)), STAGE=str(self.base / "stage"))
        self._wait_for(2)

    def _wait_for(self, nodes: int, timeout: float = 120) -> None:
        from ray.util.state import list_nodes

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self._procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Ray node exited ({p.returncode}):\n{self.logs()}")
            with contextlib.suppress(Exception):  # the dashboard is not up yet
                if len(list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")])) >= nodes:
                    return
            time.sleep(1)
        raise TimeoutError(f"{nodes} Ray node(s) not up in {timeout:.0f} s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.base.glob("*.log")))

    def probe(self, paths: Sequence[Path]) -> dict:
        """{head: node id, cpus: {node: CPUs}, seen: {node: {path: exists}}}, from a driver joined to the cluster."""
        proc = subprocess.run([sys.executable, "-c", PROBE, self.gcs, json.dumps([str(p) for p in paths])],
                              env=self._env(), capture_output=True, text=True, timeout=120, cwd=self.base)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("PROBE ")), None)
        assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-4000:]
        return json.loads(line.removeprefix("PROBE "))

    def __exit__(self, *exc: object) -> None:
        # Every descendant is noted first: a process that left the group is still ended by its pid.
        for p in self._procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                self._pids |= {c.pid for c in psutil.Process(p.pid).children(recursive=True)}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in self._procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)
            for pid in self._pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(p.poll() is None for p in self._procs):
                time.sleep(0.2)
        with contextlib.suppress(OSError):
            subprocess.run(["rm", "-rf", str(self.base)], check=False)

