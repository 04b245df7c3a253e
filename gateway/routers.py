"""The gateway's routers: the champion's routing policy (`tasks.route.RoutingPolicy`, reloaded when a new one is
promoted), routers asked for by fingerprint, and how a request's `model` names them."""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
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


class Loaded:
    """A router, called by one thread at a time (a fast tokenizer is not thread-safe). Requests that arrive while
    it is busy are batched: the next thread to get the router answers every request queued meanwhile with one
    `probs` call, so under load the router runs one batch per wait instead of one request per wait."""

    def __init__(self, fp: str, router: Routes):
        self.fp, self.router = fp, router
        self.experts: list[str] = list(router.experts)
        self._lock = threading.Lock()  # held while the router runs
        self._queued: list[tuple[str, Future]] = []
        self._queue_lock = threading.Lock()

    def probs(self, text: str) -> np.ndarray:
        mine: Future = Future()
        with self._queue_lock:
            self._queued.append((text, mine))
        with self._lock:
            if not mine.done():  # nobody took it along: run everything queued so far, this request included
                with self._queue_lock:
                    batch, self._queued = self._queued, []
                try:
                    out = np.asarray(self.router.probs([t for t, _ in batch]))
                except BaseException as e:  # every request of the batch gets the error
                    for _, f in batch:
                        f.set_exception(e)
                else:
                    for (_, f), p in zip(batch, out, strict=True):
                        f.set_result(p)
        return mine.result()


def load_router(store: Store, fp: str, quantize: str | None = None, runtime: str = "torch") -> Routes:
    from cluster.router import Router  # torch + transformers: only when a router loads

    return Router.from_store(store, fp, quantize, runtime)


class Routers:
    """The champion (with its routing policy) and recently asked-for routers, loaded once each (thread-safe; blocking:
    call in a thread)."""

    def __init__(self, store: Store, load: Callable[[Store, str], Routes] = load_router, keep: int = 4):
        self.store, self._load, self._keep = store, load, keep
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
            loaded = self._cache[fp] = Loaded(fp, self._load(self.store, fp))
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
        if opt.startswith("lambda="):
            try:
                lam = float(opt.removeprefix("lambda="))
            except ValueError:
                lam = -1.0
            if not (math.isfinite(lam) and lam >= 0):
                raise GatewayError(400, f"model {name!r}: lambda must be a number >= 0", "invalid_value", "model")
        elif fp is None and FINGERPRINT.fullmatch(opt):
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
