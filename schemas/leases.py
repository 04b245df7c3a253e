"""Leases on store artifacts, so that concurrent runs on one store never compute the same artifact twice.

`Leases` holds a run's leases (exclusive creates of `leases/<artifact path>.lease`, renewed by a heartbeat);
`compute_once` splits a list of missing artifacts between concurrent runs and waits for what others hold.

A lease's age is judged by the store's own clock: it expires `ttl_s` after its object was last written (its
modification time), whatever its writer put inside, so a node with a wrong clock, a zero-byte or a malformed lease
blocks others for one ttl at most. A run waiting on leases says so (WARNING: the cell, the owner, until when) and
gives up after `store.lease_wait_s` without progress (`LeaseTimeout`, naming the cell and the run holding it).

Two ways to keep a finished cell from being computed again by a run that planned before it was written:

- Conditional writes (`store.conditional_writes`, S3 only, the default there): a lease is created with
  `If-None-Match: *`, renewed, released and taken over with `If-Match: <its ETag>`. A finished cell's lease is
  not deleted but left in place until no other run is alive (runs announce themselves with a renewed object
  `leases/.runs/<owner>.run`, written when `Leases` is made, i.e. before the run plans anything); so a lease
  created afresh proves the cell was not finished since this run planned it, and no re-read of the cell is needed.
  Only a lease taken over (expired or released) costs that read. The last run to close deletes them.
- Otherwise (local stores, `conditional_writes: false`): leases are deleted once their cell is written, and each
  lease taken is followed by a read of the cell (`done`): a deleted lease leaves no trace.

Which S3-compatible stores honour the conditions (If-None-Match on PUT, If-Match on PUT and DELETE): AWS S3
(If-None-Match since Aug 2024, If-Match on PUT since Nov 2024, conditional DeleteObject since 2025), MinIO (both),
Ceph RGW (IBM Storage Ceph documents If-Match deletes), SeaweedFS (its wiki: atomic If-Match/If-None-Match on PUT,
If-Match on DELETE), OVHcloud and Scaleway Object Storage (their guides); moto >= 5 (the tests). A store that
ignores the headers silently would break the exclusion: set `conditional_writes: false` for it (e.g. older MinIO,
Apache Ozone before HDDS-13919, versitygw where If-Match is not implemented).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from schemas.errors import LeaseTimeout
from schemas.store import Store

LEASES_DIR = "leases"
RUNS_DIR = f"{LEASES_DIR}/.runs"  # one renewed object per live run (conditional mode)
BATCH = 500  # leases deleted per batch (S3 DeleteObjects takes up to 1000 keys)
WARN_EVERY_S = 60.0  # a run still waiting says so again this often

log = logging.getLogger("zooter.leases")


@dataclass(frozen=True)
class Lease:
    """What a lease object says, read back: its owner (None when unreadable or malformed), the store-clock time
    after which it is expired unless renewed (`until`), whether its owner released it, and its ETag."""

    owner: str | None
    token: str | None
    released: bool
    until: float
    etag: str


def _local_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


class Leases:
    """Leases on artifacts, so that concurrent runs on one store never compute the same cell twice.

    A lease is the object `leases/<artifact path>.lease` naming its owner. It is created exclusively
    (`Store.create`: one of two racing runs wins), renewed by a heartbeat thread while held, and given back once
    the artifact is written (module docstring: how, by store). A run killed outright stops renewing: `ttl_s` after
    its lease was last written (the store's modification time) any run takes the work over. In the one race the
    non-conditional mode does not close (two runs taking over the same expired lease at the same instant), both
    write the same deterministic cell atomically: the result is still one valid cell.
    `clock` (seconds, wall-clock epoch) times everything: the store's clock is read once (a probe object's
    modification time) and followed by `clock` from there, so tests pass a fake clock instead of sleeping.
    """

    def __init__(self, store: Store, owner: str | None = None, ttl_s: float | None = None,
                 clock: Callable[[], float] = time.time, wait_s: float | None = None):
        self.store, self.owner, self.clock = store, owner or uuid.uuid4().hex[:12], clock
        self.ttl_s = ttl_s or store.lease_ttl_s
        self.wait_s = wait_s or store.lease_wait_s
        self.conditional = store.conditional
        self.held: set[str] = set()
        self._written: dict[str, float] = {}  # rel -> clock() when we last wrote its lease (acquire, heartbeat)
        self._etags: dict[str, str] = {}  # lease path -> ETag of our last write (conditional mode)
        self._kept: set[str] = set()  # lease paths left in place (conditional mode), deleted by `close`
        self._done: list[str] = []  # released leases whose objects are deleted in one batch (`release_later`)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._clock0, self._mono0 = clock(), time.monotonic()
        self._store_t0: float | None = None  # the store's clock when this object was made (`store_now`)
        self._run = f"{RUNS_DIR}/{self.owner}-{uuid.uuid4().hex[:8]}.run"  # a unique name: it is only ours
        if self.conditional:
            try:  # before the run plans anything: while it is there, finished cells' leases stay (module doc)
                try:
                    etag = store.create(self._run, self._body())
                except FileExistsError:  # our create landed but its answer was lost (the store retried it)
                    etag = store.read_stamped(self._run)[2]
                self._etags[self._run] = etag or ""
            except OSError as e:
                log.warning("%s: cannot announce run %s (%s): leases fall back to re-reading each cell",
                            store.url, self.owner, e)
                self.conditional = False

    def __enter__(self) -> Leases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rel(self, rel: str) -> str:
        return f"{LEASES_DIR}/{rel}.lease"

    def _body(self, token: str = "", released: bool = False) -> bytes:
        # `expires` is informative only (older versions judged by it): expiry is the object's mtime + ttl
        return json.dumps({"owner": self.owner, "expires": self.clock() + self.ttl_s, "token": token,
                           "ttl_s": self.ttl_s, "released": released}).encode()

    # --- the store's clock ---------------------------------------------------------------------------
    def store_now(self) -> float:
        """Now by the store's clock (what lease modification times are compared with): measured once, by the
        modification time of a probe object, then advanced by `clock`."""
        if self._store_t0 is None:
            probe = f"{LEASES_DIR}/.clock-{self.owner}-{uuid.uuid4().hex[:8]}"
            self.store.write_bytes(probe, b"")
            m0 = time.monotonic()
            _, mtime, _ = self.store.read_stamped(probe)
            self.store.delete(probe)
            self._store_t0 = mtime - (m0 - self._mono0)  # the store's clock when `clock` read _clock0
        return self._store_t0 + (self.clock() - self._clock0)

    def _wall(self, t: float) -> float:
        """A store-clock time on this machine's wall clock (for messages)."""
        return t - self.store_now() + time.time()

    # --- reading leases ------------------------------------------------------------------------------
    def peek(self, rel: str) -> Lease | None:
        """The lease on rel as the store has it, or None when there is none."""
        return self._read(self._rel(rel))

    def _read(self, path: str) -> Lease | None:
        try:
            data, mtime, etag = self.store.read_stamped(path)
        except FileNotFoundError:
            return None
        try:
            body = json.loads(data)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:  # zero-byte, truncated or foreign: nobody's, expired one ttl after it was written
            body = {}
        owner, token = body.get("owner"), body.get("token")
        return Lease(owner if isinstance(owner, str) else None, token if isinstance(token, str) else None,
                     body.get("released") is True, mtime + self.ttl_s, etag)

    def holder(self, rel: str) -> dict | None:
        """The lease's content as its writer put it (None when missing or not JSON)."""
        try:
            return json.loads(self.store.read_bytes(self._rel(rel)))
        except (FileNotFoundError, ValueError):
            return None

    def is_free(self, cur: Lease | None) -> bool:
        return cur is None or cur.released or cur.until <= self.store_now()

    def free(self, rel: str) -> bool:
        """Nobody holds rel, or its holder released it or stopped renewing it (a peek; `acquire` decides)."""
        return self.is_free(self.peek(rel))

    # --- taking and giving back ----------------------------------------------------------------------
    def acquire(self, rel: str) -> bool:
        """Take the lease on rel if nobody holds it or its holder's lease expired."""
        return self.take(rel) is not None

    def take(self, rel: str) -> str | None:
        """`acquire`, saying how: "created" (there was no lease: in conditional mode, proof that rel was not
        finished since this run was made), "taken" (over an expired or released one), or None (someone holds it)."""
        path = self._rel(rel)
        for _ in range(3):
            token = uuid.uuid4().hex  # this attempt's: a create retried after a cut connection may find it
            try:
                etag = self.store.create(path, self._body(token))
                how = "created"
            except FileExistsError:
                cur = self._read(path)
                if cur is None:  # deleted meanwhile: try again
                    continue
                if cur.token == token:
                    # Our own create landed but its answer was lost (the store retried the call): the lease is
                    # ours. Taken for someone else's, it would block this run until it expired (ttl_s).
                    log.info("lease on %s: the retried create found its own first attempt", rel)
                    etag, how = cur.etag, "created"
                elif not self.is_free(cur):
                    return None
                else:
                    if not cur.released:
                        log.warning("lease on %s held by %s expired (not renewed for %.0f s): taking the work over",
                                    rel, cur.owner or "an unreadable lease", self.ttl_s)
                    if not self.conditional:
                        self.store.delete(path)
                        continue
                    etag = self.store.replace(path, self._body(token), cur.etag)
                    if etag is None:  # another run took it over first, or its owner renewed it
                        return None
                    how = "taken"
            with self._lock:
                self.held.add(rel)
                self._written[rel] = self.clock()
                if self.conditional:
                    self._etags[path] = etag or ""
                    self._kept.add(path)
            self._start()
            return how
        return None

    @contextlib.contextmanager
    def hold(self, rel: str, poll_s: float = 0.5) -> Iterator[None]:
        """Wait for the lease on rel, hold it for the block (a read-modify-write of a shared object)."""
        t0, warned = time.monotonic(), 0.0
        while not self.acquire(rel):
            cur = self.peek(rel)
            waited = time.monotonic() - t0
            if cur is not None and not self.is_free(cur):
                if waited > self.wait_s:
                    raise _timeout(self, rel, cur)
                if time.monotonic() - warned > WARN_EVERY_S:
                    warned = time.monotonic()
                    _warn_waiting(self, rel, cur, 1, t0)
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
        """Give rel's lease back now (its artifact not written, or not ours to write)."""
        path = self._rel(rel)
        if self.conditional:  # marked released, not deleted: it stays until `close` (module docstring)
            self._ours(rel)
            with self._lock:
                etag = self._etags.get(path)
            if etag:
                new = self.store.replace(path, self._body(released=True), etag)
                with self._lock:
                    self._etags[path] = new or ""
            return
        if self._ours(rel):
            self.store.delete(path)
            return
        cur = self.holder(rel)
        if cur is not None and cur.get("owner") == self.owner:
            self.store.delete(path)

    def release_later(self, rel: str) -> None:
        """Release rel once its artifact is written: renewal stops now. Without conditional writes the object
        goes in a batch delete (one request per `BATCH` on S3; `flush`, `close`); with them it stays, unrenewed,
        until `close`. Meanwhile other runs see a lease, so they skip the key and find its artifact done."""
        if self.conditional:
            self._ours(rel)
            return None
        if not self._ours(rel):
            return self.release(rel)
        with self._lock:  # a run's stages share its Leases from several threads
            self._done.append(rel)
            full = len(self._done) >= BATCH
        if full:
            self.flush()
        return None

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
            if self.conditional:
                self._renew(self._run, None)
            for rel in held:
                self._renew(self._rel(rel), rel)

    def _renew(self, path: str, rel: str | None) -> None:
        # Under the lock, and only while still held: a renewal racing a release would bring the released lease
        # back, and it would block other runs until it expired.
        with self._lock:
            if rel is not None and rel not in self.held:
                return
            try:
                now = self.clock()
                if self.conditional:
                    etag = self.store.replace(path, self._body(), self._etags.get(path, ""))
                    if etag is None:  # we stalled past the ttl and another run took it over
                        log.warning("lease %s was taken over by another run", path)
                        self.held.discard(rel)
                        return
                    self._etags[path] = etag
                else:
                    cur = self.holder(rel)
                    if cur is not None and cur.get("owner") != self.owner:  # we stalled past the ttl
                        log.warning("lease on %s was taken over by %s", rel, cur.get("owner"))
                        self.held.discard(rel)
                        return
                    self.store.write_bytes(path, self._body())
                if rel is not None:
                    self._written[rel] = now
            except OSError as e:  # the store is down: the next beat tries again, before the ttl runs out
                log.warning("lease heartbeat for %s failed: %s", path, e)

    def close(self) -> None:
        """Stop renewing and give back every lease still held (a failed stage frees its work for others); in
        conditional mode, delete the leases left in place when no other run is alive."""
        self._stop.set()
        for rel in list(self.held):
            with contextlib.suppress(OSError):
                self.release(rel)
        with contextlib.suppress(OSError):
            self.flush()
        if self.conditional:
            with contextlib.suppress(OSError):
                self._sweep()

    def _sweep(self) -> None:
        """Withdraw this run's announcement, then delete the leases it left in place unless another live run may
        still rely on them (one that planned before their cells were written). The announcement goes first: two runs
        closing at once would otherwise each see the other alive and both leave their leases behind; this way the
        later of the two sees nobody and deletes what both left."""
        self.store.delete(self._run)  # a closing run relies on no lease any more
        others = [p for p in self.store.list_stamped(RUNS_DIR) if f"{RUNS_DIR}/{p}" != self._run]
        alive = []
        for name in others:
            cur = self._read(f"{RUNS_DIR}/{name}")
            if cur is not None and not self.is_free(cur):
                alive.append(cur.owner or name)
        with self._lock:
            kept, self._kept = sorted(self._kept), set()
        if alive:
            log.info("%d lease(s) of finished cells left for live run(s) %s", len(kept), ", ".join(alive))
        else:
            self.store.delete_many(kept)
            # No other run is alive: what other runs left (their finished cells' leases, a dead run's) can go too,
            # each only if unchanged since listed (a run starting now may just have taken it over)
            mine = {*kept, self._run}
            for name, (_, etag) in self.store.list_stamped(LEASES_DIR).items():
                path = f"{LEASES_DIR}/{name}"
                if path not in mine and not name.startswith(".clock-"):
                    self.store.delete_if(path, etag)


def _warn_waiting(leases: Leases, rel: str, cur: Lease, n: int, since: float) -> None:
    gives_up = time.time() + leases.wait_s - (time.monotonic() - since)
    log.warning("waiting for %d cell(s) leased by other runs: %s is held by %s until %s unless renewed; giving up "
                "at %s (store.lease_wait_s=%g) if none of them is finished", n, leases.store.uri(rel),
                cur.owner or "an unreadable lease", _local_time(leases._wall(cur.until)), _local_time(gives_up),
                leases.wait_s)


def _timeout(leases: Leases, rel: str, cur: Lease) -> LeaseTimeout:
    return LeaseTimeout(
        f"{leases.store.uri(rel)} is still leased by run {cur.owner or '(unreadable lease)'}, which keeps renewing "
        f"it, and no cell it holds was finished in {leases.wait_s:g} s (store.lease_wait_s): wait for that run or "
        f"stop it, then rerun")


K = TypeVar("K", bound=Hashable)


def compute_once(leases: Leases | Store, todo: Iterable[K], rel: Callable[[K], str], done: Callable[[K], bool],
                 compute: Callable[[list[K], Callable[[K], bool]], Iterable[K]],
                 poll_s: float = 1.0) -> tuple[list[K], list[K]]:
    """Compute each missing artifact exactly once across concurrent runs, splitting the work between them.

    `compute(keys, claim)` works through keys, asking `claim(k)` just before starting k (True: k is leased to this
    run; False: skip it, another run has it or just wrote it), and yields each key as its artifact is written
    (its lease is given back then). Afterwards it waits for what other runs hold, taking over any lease that
    expires without its artifact; waiting `leases.wait_s` with none of them finished is a `LeaseTimeout`.
    Returns (computed here, written meanwhile by another run).
    `leases` is the run's Leases (made before `todo` was planned), or a Store: then the leases are this call's
    own, given back at the end, and every lease taken is followed by `done` (they were made after the plan)."""
    own = isinstance(leases, Store)
    if own:
        with Leases(leases) as mine:
            return _compute_once(mine, todo, rel, done, compute, poll_s, recheck=True)
    return _compute_once(leases, todo, rel, done, compute, poll_s, recheck=False)


def _compute_once(leases: Leases, todo: Iterable[K], rel: Callable[[K], str], done: Callable[[K], bool],
                  compute: Callable[[list[K], Callable[[K], bool]], Iterable[K]], poll_s: float,
                  recheck: bool) -> tuple[list[K], list[K]]:
    pending, computed, by_others, claimed = list(todo), [], [], []

    def claim(k: K) -> bool:
        how = leases.take(rel(k))
        if how is None:
            return False
        # A lease created afresh in conditional mode proves k was not finished since the run was made: finished
        # cells' leases stay while the run is alive (module docstring). Otherwise only a read of k tells.
        if (how != "created" or recheck or not leases.conditional) and done(k):
            leases.release(rel(k))  # finished by another run between our plan and our lease
            by_others.append(k)
            return False
        claimed.append(k)
        return True

    ready, since, warned, last = True, time.monotonic(), 0.0, None
    while pending:
        claimed.clear()
        before = len(computed) + len(by_others)
        if ready:  # waiting: start no pool for nothing
            for k in compute(pending, claim):
                leases.release_later(rel(k))  # the artifact is there: a live lease only makes others skip it
                computed.append(k)
            leases.flush()
        settled = set(claimed) | set(by_others)
        rest = [k for k in pending if k not in settled]
        pending = [k for k in rest if not done(k)]
        by_others += [k for k in rest if k not in pending]
        if len(computed) + len(by_others) > before:
            since = time.monotonic()  # progress: the wait for others starts again
        if not pending:
            break
        held = None
        ready = False
        for k in pending:
            cur = leases.peek(rel(k))
            if leases.is_free(cur):
                ready = True
                break
            held = held or (k, cur)
        if not claimed:
            if not ready and held is not None:
                k, cur = held
                if time.monotonic() - since > leases.wait_s:
                    raise _timeout(leases, rel(k), cur)
                if (k, cur.owner) != last or time.monotonic() - warned > WARN_EVERY_S:
                    last, warned = (k, cur.owner), time.monotonic()
                    _warn_waiting(leases, rel(k), cur, len(pending), since)
            time.sleep(poll_s)
    return computed, by_others
