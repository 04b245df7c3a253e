"""Ray: connecting, and one actor pool per model.

Each actor builds its model once (in `__init__`) and then runs per-cell jobs against it. A job is a plain
function from `tasks/` (`job(model, key)`), so the step logic stays testable without Ray; `cluster/stage.py`
drives a pool for each stage.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import ray
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
from ray.actor import ActorHandle
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from schemas.config import RayConfig, Resources
from schemas.errors import ConfigError, ZooterError

log = logging.getLogger("zooter.cluster")

# Embedded Ray's node IP: its servers listen on loopback only (see `connect`).
LOOPBACK = "127.0.0.1"

_ENV_PASSTHROUGH = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ZOOTER_CACHE", "AWS_EC2_METADATA_DISABLED")

K = TypeVar("K", bound=Hashable)


def worker_env() -> dict[str, str]:
    """The env vars this process hands every Ray worker: the passthrough ones it has, offline defaults, minus those
    that the runtime env of the Ray job it runs in (`ray job submit`) sets. ray.init refuses to merge a job's runtime
    env with the driver's when both name the same field or env var, and the job's own applies to every worker."""
    env = {k: os.environ[k] for k in _ENV_PASSTHROUGH if k in os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    job_env = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR, "{}")).get("runtime_env") or {}
    return {k: v for k, v in env.items() if k not in (job_env.get("env_vars") or {})}


def connect(cfg: RayConfig) -> None:
    """Join the configured cluster, or start embedded local Ray once per process: always a new private instance
    (`address="local"`), never one that RAY_ADDRESS or /tmp/ray/ray_current_cluster points at, which ray.init's
    default (`address=None`) would attach to.

    Joining passes no resources (the cluster has its own) and only `env_vars` as runtime env (`worker_env`), so a
    submitted job's runtime env (working_dir, its env_vars) stays in force and does not conflict with ours."""
    if ray.is_initialized():
        return
    if not cfg.address and RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ:
        # a private Ray would inherit the job's runtime env (its working_dir lives in the cluster's storage)
        raise ConfigError("ray.address: null inside a submitted Ray job; set `ray: {address: auto}` to run on the "
                          "job's cluster")
    env = worker_env()
    kw: dict[str, Any] = {"runtime_env": {"env_vars": env}, "logging_level": logging.WARNING,
                          "log_to_driver": True}
    if cfg.address:
        ray.init(address=cfg.address, **kw)
    else:
        # The job's workers look Ray up as well: Ray Train's placement-group cleaner asks the state API, which
        # takes RAY_ADDRESS, else every Ray on the machine ("Found multiple active Ray instances" when there are
        # two). So the GCS port is fixed up front and the workers are told which Ray is theirs.
        from ray._private import ray_constants

        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        env["RAY_ADDRESS"] = f"{LOOPBACK}:{port}"
        saved_port = os.environ.get(ray_constants.GCS_PORT_ENVIRONMENT_VARIABLE)
        os.environ[ray_constants.GCS_PORT_ENVIRONMENT_VARIABLE] = str(port)
        # Embedded Ray serves this process only, but on Linux Ray advertises the host's IP as the node IP and
        # binds its GCS, raylet, worker and agent servers to it or to all interfaces (0.0.0.0/::): reachable from
        # the network. Ray's single-machine path (its default on macOS/Windows) makes the node IP loopback, so
        # every one of them binds 127.0.0.1 (tests/flows/test_security.py lists the listening sockets). Passing
        # `_node_ip_address` alone is not enough: on that path ray.init resolves 127.0.0.1 back to the host's IP.
        cluster, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
        try:
            ray.init(address="local", num_cpus=cfg.num_cpus, _node_ip_address=LOOPBACK,
                     object_store_memory=512 * 1024**2, include_dashboard=cfg.dashboard, **kw)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = cluster
            if saved_port is None:
                os.environ.pop(ray_constants.GCS_PORT_ENVIRONMENT_VARIABLE)
            else:
                os.environ[ray_constants.GCS_PORT_ENVIRONMENT_VARIABLE] = saved_port
    log.info("Ray resources: %s", ray.cluster_resources())


def alive_nodes() -> int:
    """How many nodes of the connected Ray cluster are alive (1 for embedded Ray)."""
    return sum(node["Alive"] for node in ray.nodes())


@ray.remote
class ModelActor:
    """Holds one loaded model and its pool's job; runs the job per key.

    The job comes once, with the model builder: sent with every call it would be unpickled per key, and the Store
    it binds would rebuild its filesystem (on S3 a new client) each time."""

    def __init__(self, build: Callable[[], Any], job: Callable[[Any, Any], Any]):
        # A user error while building (a ZooterError: a missing file, a bad endpoint answer) is kept and raised by
        # the first call: raised here, Ray would restart the actor and hand the driver only its text, a traceback.
        self.model, self.job, self.error = None, job, None
        try:
            self.model = build()
        except ZooterError as e:
            self.error = e

    def run(self, key: Any) -> tuple[Any, Any]:
        if self.error is not None:
            raise self.error
        return key, self.job(self.model, key)

    def node_id(self) -> str:
        if self.error is not None:
            raise self.error
        return ray.get_runtime_context().get_node_id()


def get(ref: ray.ObjectRef) -> Any:
    """`ray.get`, but a ZooterError raised in an actor comes back as itself (`RayTaskError.cause`): its one-line
    message, not Ray's wrapper whose text holds the actor's ANSI-coloured traceback. Bugs stay wrapped (their
    traceback is what one needs)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ZooterError):
            raise e.cause from None
        raise


def _actor(build: Callable[[], Any], job: Any, res: Resources, tp: int):
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "max_restarts": 2,
                            "max_task_retries": 2}
    pg = None
    if tp == 1 and res.pool_size > 1:
        # Best effort: one copy of the model per node before a second one on the same node (memory, and a
        # pool that survives losing a node); on one machine this is the default placement.
        opts["scheduling_strategy"] = "SPREAD"
    if tp > 1:
        # Tensor parallel: the engine's workers each take one GPU of a placement group that the actor (and
        # everything it starts) is scheduled into; the actor itself holds no GPU.
        # Not waited for: the actor is placed once the group is, and until then it holds nothing (see `run_pool`).
        pg = placement_group([{"GPU": 1, "CPU": 1}] * tp, strategy="PACK")
        opts.update(num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_capture_child_tasks=True))
    return ModelActor.options(**opts).remote(build, job), pg


class Gate(Protocol[K]):
    """When a pool's keys may start, for a pool that runs while its inputs are still being written (a scoring pool
    whose generation cells appear one by one; cluster/stage.py `Pipeline`)."""

    def ready(self, key: K) -> bool:
        """Whether the key's inputs exist; raises when they never will (the stage writing them failed)."""
        ...

    def wait(self, timeout: float) -> None:
        """Return when a key may have become ready, or after `timeout` seconds; raises to stop the pool (another
        stage of the run failed)."""
        ...


@dataclass
class PoolUsage:
    """How busy a pool's actors were: seconds each spent in jobs, of the seconds each held its resources once
    placed with its model loaded (until released). busy = job_s / held_s."""

    job_s: float = 0.0
    held_s: float = 0.0

    @property
    def busy(self) -> float | None:
        return self.job_s / self.held_s if self.held_s > 0 else None


# Pools of this process that hold a claimed key but no placed actor (the cluster is full), by pool, with what each
# asks for. An idle gated pool gives its actors back while one of these wants what they hold, because the inputs it
# waits for may come from exactly that pool (a scoring pool holding the CPUs a generation pool needs: a deadlock).
_starving: dict[object, Resources] = {}
_starving_lock = threading.Lock()
POLL_S = 0.25  # how often a gated pool looks at its gate while its jobs run
# An idle gated pool also gives its actors back after this long: pools of other processes (a concurrent run on the
# same cluster) are not in `_starving`. A model reload costs less than the idle time it follows.
IDLE_RELEASE_S = 120.0


def _competes(pool: object, res: Resources) -> bool:
    """Whether another pool waits for resources of a kind this one holds."""
    with _starving_lock:
        return any((r.num_gpus > 0 and res.num_gpus > 0) or (r.num_cpus > 0 and res.num_cpus > 0)
                   for p, r in _starving.items() if p != pool)


def run_pool(build: Callable[[], Any], job: Callable[[Any, K], Any], keys: Sequence[K], res: Resources,
             tp: int = 1, claim: Callable[[K], bool] | None = None, nodes: set[str] | None = None,
             gate: Gate[K] | None = None, usage: PoolUsage | None = None) -> Iterator[tuple[K, Any]]:
    """Start up to `res.pool_size` actors that each build the model once, run `job(model, key)` for the keys, yield
    (key, result) as they finish (unordered), then release the actors so their CPUs/GPUs go to the next pool.

    `claim(key)` is asked just before a key goes to a free actor; False skips it (another run took it), so
    concurrent runs split the work. No actor starts unless a first key is claimed, and only actors Ray has placed
    get keys. The Ray node ids of the actors that computed keys are added to `nodes` (the stage's placements,
    recorded in the run manifest), their busy time to `usage`.

    `gate`: a key starts only once `gate.ready(key)` (the first ready one in key order goes next). While no key is
    ready and no job runs, the pool waits on the gate; if meanwhile another pool of this process waits for resources
    of the kind its actors hold (or after IDLE_RELEASE_S idle), it gives them back and starts new ones (model load
    included) once keys are ready."""
    remaining, pool = list(keys), object()

    def next_key() -> tuple[K] | None:  # a 1-tuple: a falsy key is still a key
        i = 0
        while i < len(remaining):
            if gate is not None and not gate.ready(remaining[i]):
                i += 1
                continue
            k = remaining.pop(i)
            if claim is None or claim(k):
                return (k,)
        return None

    started: list[tuple[ActorHandle, Any]] = []
    pending: dict[ray.ObjectRef, ActorHandle] = {}
    free: list[tuple[ActorHandle, str, float]] = []  # placed actors with no job, their node, since when placed
    running: dict[ray.ObjectRef, tuple[ActorHandle, str, float, float]] = {}  # ..., and since when in the job
    nxt: tuple[K] | None = None
    job_ref: ray.ObjectRef | None = None
    idle_since: float | None = None
    use = usage if usage is not None else PoolUsage()

    def release() -> None:
        now = time.perf_counter()
        use.held_s += sum(now - a[2] for a in [*free, *running.values()])
        for actor, pg in started:
            ray.kill(actor)
            if pg is not None:
                remove_placement_group(pg)
        started.clear(), pending.clear(), free.clear(), running.clear()

    try:
        while True:
            while free:
                if nxt is None:
                    nxt = next_key()  # claimed only now that an actor is free to take it
                    if nxt is None:
                        break
                actor, node, since = free.pop()
                running[actor.run.remote(nxt[0])] = actor, node, since, time.perf_counter()
                nxt = None
            if not started:
                nxt = nxt or next_key()
                if nxt is not None:
                    # Only placed actors (their node_id call returned) get keys; the others join when Ray places
                    # them. So a pool never waits on a job queued behind an actor that cannot start: pools that
                    # compete for scarce CPUs/GPUs each finish on the actors they have, then release all of them
                    # (pending ones too) to the next.
                    if job_ref is None:  # the job pickled once for the pool: each actor resolves the ref at start
                        job_ref = ray.put(job)
                    started += [_actor(build, job_ref, res, tp)
                                for _ in range(min(res.pool_size, len(remaining) + 1))]
                    pending.update({actor.node_id.remote(): actor for actor, _ in started})
            if nxt is None and not running:
                if not remaining:
                    return
                # Only a gate leaves keys behind: none of them is ready yet.
                with _starving_lock:
                    _starving.pop(pool, None)
                idle_since = idle_since or time.perf_counter()
                if started and (_competes(pool, res) or time.perf_counter() - idle_since > IDLE_RELEASE_S):
                    log.info("an idle pool gives back %d actor(s) for other pools", len(started))
                    release()
                if not pending:
                    gate.wait(POLL_S)
                    continue
            else:
                idle_since = None
            with _starving_lock:
                if nxt is not None and not free and not running:
                    _starving[pool] = res
                else:
                    _starving.pop(pool, None)
            if gate is None:
                [ref], _ = ray.wait([*running, *pending], num_returns=1)
            else:
                done, _ = ray.wait([*running, *pending], num_returns=1, timeout=POLL_S)
                if not done:
                    gate.wait(0)  # raises if the run failed meanwhile; keys that became ready go out above
                    continue
                ref = done[0]
            if ref in pending:
                free.append((pending.pop(ref), get(ref), time.perf_counter()))  # a failed start raises here
                continue
            out = get(ref)
            actor, node, since, t_job = running.pop(ref)
            use.job_s += time.perf_counter() - t_job
            free.append((actor, node, since))
            if nodes is not None:
                nodes.add(node)
            yield out
    finally:
        with _starving_lock:
            _starving.pop(pool, None)
        release()
