"""Ray: connecting, and one actor pool per model.

Each actor builds its model once (in `__init__`) and then runs per-cell jobs against it. A job is a plain
function from `tasks/` (`job(model, key)`), so the step logic stays testable without Ray; `cluster/stage.py`
drives a pool for each stage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, TypeVar

import ray
from ray.util import ActorPool
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from schemas.config import RayConfig, Resources

log = logging.getLogger("zooter.cluster")

# Embedded Ray's node IP: its servers listen on loopback only (see `connect`).
LOOPBACK = "127.0.0.1"

_ENV_PASSTHROUGH = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ZOOTER_CACHE", "AWS_EC2_METADATA_DISABLED")

K = TypeVar("K", bound=Hashable)


def connect(cfg: RayConfig) -> None:
    """Join the configured cluster, or start embedded local Ray once per process: always a new private instance
    (`address="local"`), never one that RAY_ADDRESS or /tmp/ray/ray_current_cluster points at, which ray.init's
    default (`address=None`) would attach to."""
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _ENV_PASSTHROUGH if k in os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
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
                     object_store_memory=512 * 1024**2, **kw)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = cluster
            if saved_port is None:
                os.environ.pop(ray_constants.GCS_PORT_ENVIRONMENT_VARIABLE)
            else:
                os.environ[ray_constants.GCS_PORT_ENVIRONMENT_VARIABLE] = saved_port
    log.info("Ray resources: %s", ray.cluster_resources())


@ray.remote
class ModelActor:
    """Holds one loaded model; runs per-cell jobs against it."""

    def __init__(self, build: Callable[[], Any]):
        self.model = build()

    def run(self, job: Callable[[Any, Any], Any], key: Any) -> tuple[Any, Any]:
        return key, job(self.model, key)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def _actor(build: Callable[[], Any], res: Resources, tp: int):
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
        pg = placement_group([{"GPU": 1, "CPU": 1}] * tp, strategy="PACK")
        ray.get(pg.ready())
        opts.update(num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_capture_child_tasks=True))
    return ModelActor.options(**opts).remote(build), pg


def run_pool(build: Callable[[], Any], job: Callable[[Any, K], Any], keys: Sequence[K], res: Resources,
             tp: int = 1, claim: Callable[[K], bool] | None = None,
             nodes: set[str] | None = None) -> Iterator[tuple[K, Any]]:
    """Start up to `res.pool_size` actors that each build the model once, run `job(model, key)` for the keys, yield
    (key, result) as they finish (unordered), then release the actors so their CPUs/GPUs go to the next pool.

    `claim(key)` is asked just before a key goes to a free actor; False skips it (another run took it), so
    concurrent runs split the work. No actor starts unless a first key is claimed. The Ray node ids the actors
    ran on are added to `nodes` (the stage's placements, recorded in the run manifest)."""
    order = iter(enumerate(keys))

    def next_key() -> tuple[int, K] | None:  # (position, key): a falsy key is still a key
        return next(((i, k) for i, k in order if claim is None or claim(k)), None)

    nxt = next_key()
    if nxt is None:
        return
    started = [_actor(build, res, tp) for _ in range(min(res.pool_size, len(keys) - nxt[0]))]
    # Asked now, read at the end without waiting: an actor that never got resources must not block the pool.
    where = [a.node_id.remote() for a, _ in started]
    try:
        pool = ActorPool([a for a, _ in started])
        while True:
            while nxt is not None:
                pool.submit(lambda a, k: a.run.remote(job, k), nxt[1])
                nxt = next_key() if pool.has_free() else None
            if not pool.has_next():
                return
            yield pool.get_next_unordered()
            nxt = next_key()
    finally:
        ready, _ = ray.wait(where, num_returns=len(where), timeout=0)
        for ref in ready:
            with contextlib.suppress(ray.exceptions.RayError):  # the actor died; its jobs went elsewhere
                if nodes is not None:
                    nodes.add(ray.get(ref))
        for a, pg in started:
            ray.kill(a)
            if pg is not None:
                remove_placement_group(pg)
