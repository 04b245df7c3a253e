"""The gateway's routers: the champion's routing policy (`tasks.route.RoutingPolicy`, reloaded when a new one is
promoted), routers asked for by fingerprint, and how a request's `model` names them."""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from gateway.errors import GatewayError
from schemas.artifacts import CHAMPION_PATH, ROUTER_JSON, router_file
from schemas.errors import ArtifactError
from schemas.evaluation import read_champion
from schemas.store import Store
from tasks.route import Routes, RoutingPolicy

MODEL = "zooter"  # the model name clients send
FINGERPRINT = re.compile(r"[0-9a-f]{6,64}")
MAX_QUEUE = 256  # requests waiting per router beyond which the gateway answers 429 (--max-queue)
MAX_BATCH = 32  # requests per router call


class Loaded:
    """A router served by a worker thread of its own, one `probs` call at a time (a fast tokenizer is not
    thread-safe). Requests wait in a bounded queue; each call takes up to `max_batch` of them at once, so under load
    the router runs one batch per wait instead of one request per wait. A request that finds `max_queue` others
    waiting is refused at once (429, `Retry-After`) instead of joining a wait that only grows. The worker starts
    with the first request and ends after `idle_s` without one (an evicted router leaves no thread behind)."""

    def __init__(self, fp: str, router: Routes, max_queue: int = MAX_QUEUE, max_batch: int = MAX_BATCH,
                 idle_s: float = 10.0):
        self.fp, self.router = fp, router
        self.experts: list[str] = list(router.experts)
        self.max_queue, self.max_batch, self._idle_s = max_queue, max_batch, idle_s
        self._queued: deque[tuple[str, Future]] = deque()
        self._wake = threading.Condition()
        self._worker: threading.Thread | None = None

    def submit(self, text: str) -> Future:
        """Queue `text`; the future gets its probabilities (or the router's exception). A GatewayError 429 when
        the queue is full."""
        mine: Future = Future()
        with self._wake:
            if len(self._queued) >= self.max_queue:
                raise GatewayError(429, f"router {self.fp} has {len(self._queued)} requests waiting, its limit "
                                   "(--max-queue); retry shortly", "rate_limit_exceeded", kind="requests",
                                   headers={"retry-after": "1"})
            self._queued.append((text, mine))
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name=f"router-{self.fp}", daemon=True)
                self._worker.start()
            else:
                self._wake.notify()
        return mine

    def probs(self, text: str) -> np.ndarray:
        """`text`'s probabilities (blocking)."""
        return self.submit(text).result()

    def _work(self) -> None:
        while True:
            with self._wake:
                if not self._queued and not self._wake.wait_for(lambda: self._queued, self._idle_s):
                    self._worker = None  # under the lock: the next submit starts a new worker
                    return
                batch = [self._queued.popleft() for _ in range(min(self.max_batch, len(self._queued)))]
            batch = [(t, f) for t, f in batch if f.set_running_or_notify_cancel()]  # not those given up on
            if not batch:
                continue
            try:
                out = np.asarray(self.router.probs([t for t, _ in batch]))
            except BaseException as e:  # noqa: BLE001 - every request of the batch gets the error; the worker lives on
                for _, f in batch:
                    f.set_exception(e)
            else:
                for (_, f), p in zip(batch, out, strict=True):
                    f.set_result(p)


def load_router(store: Store, fp: str, quantize: str | None = None, runtime: str = "torch") -> Routes:
    from cluster.router import Router  # torch + transformers: only when a router loads

    return Router.from_store(store, fp, quantize, runtime)


class Routers:
    """The champion (with its routing policy) and recently asked-for routers, loaded once each (thread-safe; blocking:
    call in a thread)."""

    def __init__(self, store: Store, load: Callable[[Store, str], Routes] = load_router, keep: int = 4,
                 max_queue: int = MAX_QUEUE):
        self.store, self._load, self._keep, self._max_queue = store, load, keep, max_queue
        self._cache: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._pinned: str | None = None  # the champion's fingerprint: never evicted
        self.champion: Loaded
        self.policy: RoutingPolicy
        self.refresh()

    def refresh(self) -> bool:
        """Load the store's champion and its routing policy when they changed; True when they did."""
        champ = read_champion(self.store)
        if champ is None:
            raise ArtifactError(f"{self.store.uri(CHAMPION_PATH)}: the store has no champion router; train one first")
        if self._pinned == champ.router_fp:
            return False
        policy = RoutingPolicy.of(self.store, champ)  # its evaluation read once: costs, lambda, fallback
        loaded = self.get(champ.router_fp)
        self._pinned, self.champion, self.policy = champ.router_fp, loaded, policy
        return True

    def get(self, fp: str) -> Loaded:
        """The router `fp`; an ArtifactError when the store has none. Loads hold the lock: they are rare."""
        with self._lock:
            if fp in self._cache:
                self._cache.move_to_end(fp)
                return self._cache[fp]
            if not self.store.exists(router_file(fp, ROUTER_JSON)):
                raise ArtifactError(f"no router {fp} in {self.store.url}")
            loaded = self._cache[fp] = Loaded(fp, self._load(self.store, fp), self._max_queue)
            for old in [k for k in self._cache if k != self._pinned][:-self._keep]:
                del self._cache[old]  # least recently used first
            return loaded


def parse_model(name: str) -> tuple[str | None, float | None]:
    """`zooter[:<fingerprint>][:lambda=<x>]` -> (fingerprint or None for the champion, lambda or None)."""
    head, *opts = name.split(":")
    if head != MODEL:
        raise GatewayError(404, f"model {name!r} does not exist; use {MODEL!r} (the champion), "
                           f"'{MODEL}:<router fingerprint>' or '{MODEL}:lambda=<x>'", "model_not_found", "model")
    fp = lam = None
    for opt in opts:
        if opt.startswith("lambda=") and lam is not None or fp is not None and FINGERPRINT.fullmatch(opt):
            what = "lambda" if opt.startswith("lambda=") else "a router fingerprint"
            raise GatewayError(400, f"model {name!r}: {what} is given twice", "invalid_value", "model")
        if opt.startswith("lambda="):
            try:
                lam = float(opt.removeprefix("lambda="))
            except ValueError:
                lam = -1.0
            if not (math.isfinite(lam) and lam >= 0):
                raise GatewayError(400, f"model {name!r}: lambda must be a number >= 0", "invalid_value", "model")
        elif FINGERPRINT.fullmatch(opt):
            fp = opt
        else:
            raise GatewayError(404, f"model {name!r} does not exist: {opt!r} is not a router fingerprint "
                               "(lowercase hex) or lambda=<x>", "model_not_found", "model")
    return fp, lam


@dataclass(frozen=True)
class Decision:
    """One routing decision (what /v1/route answers)."""

    expert: str
    probs: dict[str, float]
    router: str
    lam: float

    def as_json(self) -> dict:
        return {"expert": self.expert, "probs": self.probs, "router": self.router, "lambda": self.lam}
