"""Ray: connecting, and one actor pool per model.

Each actor builds its model once (in `__init__`) and then runs whole-shard jobs against it. The jobs are plain
functions from `tasks/` (`fn(model, *args)`), so the step logic stays testable without Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ray
from ray.util import ActorPool
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from schemas.config import RayConfig, Resources

log = logging.getLogger("zooter.cluster")

# Modules actors must import: shipped to the workers of a remote cluster by the runtime environment.
PROJECT_MODULES = ["flows", "tasks", "cluster", "schemas"]

# Embedded Ray's node IP: its servers listen on loopback only (see `connect`).
LOOPBACK = "127.0.0.1"

_ENV_PASSTHROUGH = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ZOOTER_CACHE", "AWS_EC2_METADATA_DISABLED")

# Where each pool's actors ran: pool key ("<job function>:<spec name>", see `pool_key`) -> Ray node ids of its
# last run in this process. The flow copies it into the run manifest, the lineage of a multi-node run.
PLACEMENTS: dict[str, list[str]] = {}
_placements_lock = threading.Lock()


def pool_key(fn: Callable[..., Any], spec: Any) -> str:
    return f"{getattr(fn, '__name__', fn)}:{getattr(spec, 'name', spec)}"


def connect(cfg: RayConfig) -> None:
    """Join the configured cluster, or start embedded local Ray once per process."""
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
        # Embedded Ray serves this process only, but on Linux Ray advertises the host's IP as the node IP and
        # binds its GCS, raylet, worker and agent servers to it or to all interfaces (0.0.0.0/::): reachable from
        # the network. Ray's single-machine path (its default on macOS/Windows) makes the node IP loopback, so
        # every one of them binds 127.0.0.1 (tests/flows/test_security.py lists the listening sockets). Passing
        # `_node_ip_address` alone is not enough: on that path ray.init resolves 127.0.0.1 back to the host's IP.
        from ray._private import ray_constants

        cluster, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
        try:
            ray.init(num_cpus=cfg.num_cpus, _node_ip_address=LOOPBACK,
                     object_store_memory=512 * 1024**2, **kw)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = cluster
    log.info("Ray resources: %s", ray.cluster_resources())


@ray.remote
class ModelActor:
    """Holds one loaded model; runs whole-shard jobs against it."""

    def __init__(self, build: Callable[[], Any]):
        self.model = build()

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)

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


def run_pool(build: Callable[[], Any], jobs: Iterable[tuple[Callable[..., Any], tuple]],
             res: Resources, tp: int = 1, claim: Callable[[int], bool] | None = None) -> Iterator[Any]:
    """Start up to `res.pool_size` actors that each build the model once, feed them the jobs, yield results as
    they finish (unordered), then release the actors so their CPUs/GPUs go to the next pool.

    `claim(i)` is asked just before job i goes to a free actor; False skips the job (another run took it), so
    concurrent runs split the work. No actor starts unless a first job is claimed."""
    jobs = list(jobs)
    order = iter(range(len(jobs)))

    def next_job() -> int | None:
        return next((i for i in order if claim is None or claim(i)), None)

    first = next_job()
    if first is None:
        return
    started = [_actor(build, res, tp) for _ in range(min(res.pool_size, len(jobs) - first))]
    # Asked now, read at the end without waiting: an actor that never got resources must not block the pool.
    nodes = [a.node_id.remote() for a, _ in started]
    try:
        pool = ActorPool([a for a, _ in started])
        i: int | None = first
        while True:
            while i is not None:
                pool.submit(lambda a, job: a.run.remote(job[0], *job[1]), jobs[i])
                i = next_job() if pool.has_free() else None
            if not pool.has_next():
                return
            yield pool.get_next_unordered()
            i = next_job()
    finally:
        ready, _ = ray.wait(nodes, num_returns=len(nodes), timeout=0)
        placed = []
        for ref in ready:
            with contextlib.suppress(ray.exceptions.RayError):  # the actor died; its jobs went elsewhere
                placed.append(ray.get(ref))
        with _placements_lock:
            PLACEMENTS[pool_key(jobs[0][0], jobs[0][1][0])] = sorted(set(placed))
        for a, pg in started:
            ray.kill(a)
            if pg is not None:
                remove_placement_group(pg)
