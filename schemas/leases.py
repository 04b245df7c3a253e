"""Leases on store artifacts, so that concurrent runs on one store never compute the same artifact twice.

`Leases` holds a run's leases (exclusive creates of `leases/<artifact path>.lease`, renewed by a heartbeat);
`compute_once` splits a list of missing artifacts between concurrent runs and waits for what others hold.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TypeVar

from schemas.store import Store

LEASES_DIR = "leases"
BATCH = 500  # leases deleted per batch (S3 DeleteObjects takes up to 1000 keys)

log = logging.getLogger("zooter.leases")


class Leases:
    """Leases on artifacts, so that concurrent runs on one store never compute the same cell twice.

    A lease is the object `leases/<artifact path>.lease` holding its owner and an expiry time. It is created
    exclusively (`Store.create`: one of two racing runs wins), renewed by a heartbeat thread while held, and
    deleted once the artifact is written. A run killed outright stops renewing: after `ttl_s` its leases expire
    and any run takes the work over. Expiry compares wall clocks, so nodes need roughly synchronised clocks
    (seconds, not minutes). In the one race leases do not close (two runs taking over the same expired lease
    at the same instant), both write the same deterministic cell atomically: the result is still one valid cell.
    `clock` (seconds, wall-clock epoch) is read for every expiry: tests pass a fake one instead of sleeping.
    """

    def __init__(self, store: Store, owner: str | None = None, ttl_s: float | None = None,
                 clock: Callable[[], float] = time.time):
        self.store, self.owner, self.clock = store, owner or uuid.uuid4().hex[:12], clock
        self.ttl_s = ttl_s or store.lease_ttl_s
        self.held: set[str] = set()
        self._written: dict[str, float] = {}  # rel -> clock() when we last wrote its lease (acquire, heartbeat)
        self._done: list[str] = []  # released leases whose objects are deleted in one batch (`release_later`)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> Leases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rel(self, rel: str) -> str:
        return f"{LEASES_DIR}/{rel}.lease"

    def _body(self, token: str = "") -> bytes:
        return json.dumps({"owner": self.owner, "expires": self.clock() + self.ttl_s, "token": token}).encode()

    def holder(self, rel: str) -> dict | None:
        try:
            return json.loads(self.store.read_bytes(self._rel(rel)))
        except (FileNotFoundError, ValueError):
            return None

    def free(self, rel: str) -> bool:
        """Nobody holds rel, or its holder's lease expired (a peek; `acquire` decides)."""
        cur = self.holder(rel)
        return cur is None or cur.get("expires", 0) <= self.clock()

    def acquire(self, rel: str) -> bool:
        """Take the lease on rel if nobody holds it or its holder's lease expired."""
        for _ in range(2):
            token = uuid.uuid4().hex  # this attempt's: a create retried after a cut connection may find it
            try:
                self.store.create(self._rel(rel), self._body(token))
            except FileExistsError:
                cur = self.holder(rel)
                if cur is not None and cur.get("token") == token:
                    # Our own create landed but its answer was lost (the store retried the call): the lease is
                    # ours. Taken for someone else's, it would block this run until it expired (ttl_s).
                    log.info("lease on %s: the retried create found its own first attempt", rel)
                elif cur is not None and cur.get("expires", 0) > self.clock():
                    return False
                else:
                    if cur is not None:
                        log.warning("lease on %s held by %s expired: taking the work over", rel, cur.get("owner"))
                        self.store.delete(self._rel(rel))
                    continue
            with self._lock:
                self.held.add(rel)
                self._written[rel] = self.clock()
            self._start()
            return True
        return False

    @contextlib.contextmanager
    def hold(self, rel: str, poll_s: float = 0.5) -> Iterator[None]:
        """Wait for the lease on rel, hold it for the block (a read-modify-write of a shared object)."""
        while not self.acquire(rel):
            time.sleep(poll_s)
        try:
            yield
        finally:
            self.release(rel)

    def _ours(self, rel: str) -> bool:
        """Stop renewing rel; True when its lease is certainly still ours without reading it: we wrote it less
        than ttl/2 ago, so no other run (clocks within ttl/2) can have found it expired and taken it over."""
        with self._lock:
            self.held.discard(rel)
            written = self._written.pop(rel, None)
        return written is not None and self.clock() - written < self.ttl_s / 2

    def release(self, rel: str) -> None:
        if self._ours(rel):
            self.store.delete(self._rel(rel))
            return
        cur = self.holder(rel)
        if cur is not None and cur.get("owner") == self.owner:
            self.store.delete(self._rel(rel))

    def release_later(self, rel: str) -> None:
        """Release rel once its artifact is written: renewal stops now, the object goes in a batch delete (one
        request per `BATCH` on S3; `flush`, `close`). Until then other runs see a live lease, so they skip the
        key and find its artifact done, as they would after `release`."""
        if not self._ours(rel):
            return self.release(rel)
        with self._lock:  # a run's stages share its Leases from several threads
            self._done.append(rel)
            full = len(self._done) >= BATCH
        if full:
            self.flush()

    def flush(self) -> None:
        """Delete the leases `release_later` gave back."""
        with self._lock:
            done, self._done = self._done, []
        self.store.delete_many([self._rel(r) for r in done])

    def _start(self) -> None:
        if self._beat is None:
            self._beat = threading.Thread(target=self._heartbeat, name=f"leases-{self.owner}", daemon=True)
            self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with self._lock:
                held = list(self.held)
            for rel in held:
                # Under the lock, and only while still held: a renewal racing a release would bring the deleted
                # lease back, and it would block other runs until it expired.
                with self._lock:
                    if rel not in self.held:
                        continue
                    try:
                        cur = self.holder(rel)
                        if cur is not None and cur.get("owner") != self.owner:  # we stalled past the ttl
                            log.warning("lease on %s was taken over by %s", rel, cur.get("owner"))
                            self.held.discard(rel)
                            continue
                        now = self.clock()
                        self.store.write_bytes(self._rel(rel), self._body())
                        self._written[rel] = now
                    except OSError as e:  # the store is down: the next beat tries again, before the ttl runs out
                        log.warning("lease heartbeat for %s failed: %s", rel, e)

    def close(self) -> None:
        """Stop renewing and give back every lease still held (a failed stage frees its work for others)."""
        self._stop.set()
        for rel in list(self.held):
            with contextlib.suppress(OSError):
                self.release(rel)
        with contextlib.suppress(OSError):
            self.flush()


K = TypeVar("K", bound=Hashable)


def compute_once(leases: Leases | Store, todo: Iterable[K], rel: Callable[[K], str], done: Callable[[K], bool],
                 compute: Callable[[list[K], Callable[[K], bool]], Iterable[K]],
                 poll_s: float = 1.0) -> tuple[list[K], list[K]]:
    """Compute each missing artifact exactly once across concurrent runs, splitting the work between them.

    `compute(keys, claim)` works through keys, asking `claim(k)` just before starting k (True: k is leased to this
    run; False: skip it, another run has it or just wrote it), and yields each key as its artifact is written
    (its lease is given back then). Afterwards it waits for what other runs hold, taking over any lease that
    expires without its artifact. Returns (computed here, written meanwhile by another run).
    `leases` is the run's Leases, or a Store: then the leases are this call's own, given back at the end."""
    if isinstance(leases, Store):
        with Leases(leases) as own:
            return compute_once(own, todo, rel, done, compute, poll_s)
    pending, computed, by_others, claimed = list(todo), [], [], []

    def claim(k: K) -> bool:
        if not leases.acquire(rel(k)):
            return False
        if done(k):  # finished by another run between our check and our lease
            leases.release(rel(k))
            by_others.append(k)
            return False
        claimed.append(k)
        return True

    first = True
    while pending:
        claimed.clear()
        if first or any(leases.free(rel(k)) for k in pending):  # waiting: start no pool for nothing
            for k in compute(pending, claim):
                leases.release_later(rel(k))  # the artifact is there: a live lease only makes others skip it
                computed.append(k)
            leases.flush()
        first = False
        settled = set(claimed) | set(by_others)
        rest = [k for k in pending if k not in settled]
        pending = [k for k in rest if not done(k)]
        by_others += [k for k in rest if k not in pending]
        if pending and not claimed:
            log.info("waiting for %d artifact(s) leased by other runs", len(pending))
            time.sleep(poll_s)
    return computed, by_others
