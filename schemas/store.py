"""The artifact store: a local directory or s3://bucket/prefix, with atomic writes and validating reads.

Writes are atomic: locally a temp file in the same directory is renamed over the target; on S3 an object only
becomes visible when its single PUT (or multipart upload) completes. So a reader sees a whole cell or none.

A remote store retries every call that fails because the endpoint is unreachable (exponential backoff, a
budget of `retries` attempts), then fails with `StoreUnavailable` naming the operation. Concurrent runs
coordinate through leases (`Leases`, `compute_once`): each cell is computed by one run, the others wait for it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, TypeVar

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.artifacts import SCHEMA_VERSION

META_KEY = b"zooter"
LEASES_DIR = "leases"

log = logging.getLogger("zooter.store")


class ArtifactError(ValueError):
    """An artifact is missing, unreadable or does not match its schema."""


class StoreUnavailable(OSError):
    """The store's endpoint stayed unreachable for the whole retry budget."""


@functools.cache
def _retryable() -> tuple[type[BaseException], ...]:
    """Errors that mean "the endpoint is not answering", not "the request is wrong"."""
    errs: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import botocore.exceptions as be

        errs += [be.ConnectionError, be.HTTPClientError, be.ReadTimeoutError]
    with contextlib.suppress(ImportError):
        import aiohttp

        errs.append(aiohttp.ClientConnectionError)
    return tuple(errs)


class Store:
    def __init__(self, url: str, options: dict[str, Any] | None = None, retries: int = 5, backoff_s: float = 1.0,
                 lease_ttl_s: float = 120.0):
        self.url = url.rstrip("/")
        self.options = dict(options or {})
        self.retries, self.backoff_s, self.lease_ttl_s = retries, backoff_s, lease_ttl_s
        remote = "://" in self.url and not self.url.startswith("file://")
        # Other processes (actors) write cells: a remote store must not answer from a stale listing cache.
        extra = {"use_listings_cache": False, "skip_instance_cache": True} if remote else {}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **extra, **self.options)
        self.local = not remote

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @classmethod
    def from_config(cls, cfg: Any) -> Store:
        """From a `schemas.config.StoreConfig`."""
        return cls(cfg.url, cfg.options, cfg.retries, cfg.backoff_s, cfg.lease_ttl_s)

    def __getstate__(self) -> dict:  # picklable for Ray actors: rebuild the filesystem there
        return {"url": self.url, "options": self.options, "retries": self.retries, "backoff_s": self.backoff_s,
                "lease_ttl_s": self.lease_ttl_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _io(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Call fn, retrying with exponential backoff while a remote endpoint is unreachable."""
        if self.local:
            return fn(*args, **kw)
        t0, delay = time.monotonic(), self.backoff_s
        for attempt in range(1, self.retries + 2):
            try:
                return fn(*args, **kw)
            except _retryable() as e:
                if attempt > self.retries:
                    raise StoreUnavailable(
                        f"{self.url}: {what} failed {attempt} times over {time.monotonic() - t0:.0f} s, the store "
                        f"is unreachable ({type(e).__name__}: {e}); nothing partial was written, rerun when it is "
                        "back") from None
                log.warning("%s: %s failed (%s), retry %d/%d in %.1f s", self.url, what, type(e).__name__,
                            attempt, self.retries, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def path(self, rel: str) -> str:
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ArtifactError(f"unsafe store path {rel!r}")
        return posixpath.join(self.root, rel)

    def uri(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def exists(self, rel: str) -> bool:
        return self._io(f"exists {rel}", self.fs.exists, self.path(rel))

    def ls(self, rel: str) -> list[str]:
        """Names directly under rel (empty when it does not exist)."""
        try:
            found = self._io(f"ls {rel}", self.fs.ls, self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in found)

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._io(f"delete {rel}", self.fs.rm_file, self.path(rel))

    # --- atomic writes -------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.local:
            self._put_local(self.path(rel), data, os.replace)
        else:
            self._io(f"write {rel}", self.fs.pipe_file, self.path(rel), data)

    def create(self, rel: str, data: bytes) -> None:
        """Write rel only if it does not exist yet (atomically: one of two racing writers wins); else
        FileExistsError. Locally a hard link of a complete temp file; on S3 a conditional PUT (If-None-Match)."""
        if self.local:
            self._put_local(self.path(rel), data, os.link)  # link fails with FileExistsError when target exists
        else:
            self._io(f"create {rel}", self.fs.pipe_file, self.path(rel), data, mode="create")

    @staticmethod
    def _put_local(target: str, data: bytes, publish: Callable[[str, str], None]) -> None:
        """Write a complete, fsynced temp file beside target, then publish it (rename or link) in one step."""
        d = os.path.dirname(target)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}-{os.path.basename(target)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            publish(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write_table(self, rel: str, table: pa.Table, schema: pa.Schema, meta: dict | None = None,
                    exclusive: bool = False) -> None:
        """Write a cell; `exclusive`: only if it does not exist (`create`), else FileExistsError."""
        table = conform(table, schema, rel)
        md = {META_KEY: json.dumps({"schema_version": SCHEMA_VERSION, **(meta or {})}, default=str).encode()}
        table = table.replace_schema_metadata(md)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        (self.create if exclusive else self.write_bytes)(rel, buf.getvalue())

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=False, default=str).encode())

    # --- validating reads ----------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        return self._io(f"read {rel}", self.fs.cat_file, self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def _parquet(self, rel: str, read: Callable[..., Any]) -> Any:
        try:
            return self._io(f"read {rel}", read, self.path(rel), filesystem=self.fs)
        except FileNotFoundError:
            raise ArtifactError(f"{self.uri(rel)}: missing") from None
        except StoreUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - any parse error means a broken cell
            raise ArtifactError(f"{self.uri(rel)}: unreadable Parquet ({e})") from None

    def read_schema(self, rel: str) -> pa.Schema:
        """The cell's schema (with its key-value metadata), from the Parquet footer only."""
        return self._parquet(rel, pq.read_schema)

    def read_meta(self, rel: str) -> dict:
        """The cell's key-value metadata, read from the Parquet footer only."""
        return json.loads((self.read_schema(rel).metadata or {}).get(META_KEY, b"{}"))

    def read_table(self, rel: str, schema: pa.Schema) -> pa.Table:
        return conform(self._parquet(rel, pq.read_table), schema, self.uri(rel))

    def cell(self, rel: str, schema: pa.Schema, fingerprint: str) -> tuple[str | None, dict]:
        """(None, the cell's metadata) when the cell is done: it exists, its footer parses, its schema matches and
        it names our fingerprint. Otherwise (why not: "missing", or what is wrong with the file there, {})."""
        if not self.exists(rel):
            return "missing", {}
        try:
            got = self.read_schema(rel)
        except ArtifactError as e:
            return str(e).removeprefix(f"{self.uri(rel)}: "), {}
        if not same_fields(got, schema):
            return f"schema mismatch (columns {got.names})", {}
        meta = json.loads((got.metadata or {}).get(META_KEY, b"{}"))
        if meta.get("fingerprint") != fingerprint:
            return f"fingerprint {meta.get('fingerprint')!r} is not {fingerprint!r}", {}
        return None, meta

    def check_cell(self, rel: str, schema: pa.Schema, fingerprint: str) -> str | None:
        return self.cell(rel, schema, fingerprint)[0]

    def valid_cell(self, rel: str, schema: pa.Schema, fingerprint: str) -> bool:
        return self.check_cell(rel, schema, fingerprint) is None

    def arrow_fs(self) -> pafs.FileSystem:
        """This store's filesystem for pyarrow users (Ray Train checkpoints): same endpoint and credentials."""
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def scan(self, rels: list[str]) -> pl.LazyFrame:
        """A lazy Polars frame over cells (streams; works for local and remote stores)."""
        paths = [self.path(r) for r in rels]
        if self.local:
            return pl.scan_parquet(paths)
        return pl.scan_pyarrow_dataset(pads.dataset(paths, filesystem=self.fs, format="parquet"))


def same_fields(got: pa.Schema, want: pa.Schema) -> bool:
    return [(f.name, f.type) for f in got] == [(f.name, f.type) for f in want]


def conform(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Cast a table to an artifact schema, or fail naming the file and the offending column."""
    names = table.column_names
    missing = [f.name for f in schema if f.name not in names]
    extra = [n for n in names if n not in schema.names]
    if missing or extra:
        raise ArtifactError(f"{where}: schema mismatch (missing columns {missing}, unexpected {extra})")
    table = table.select(schema.names)
    for f in schema:
        if not f.nullable and table.column(f.name).null_count:
            raise ArtifactError(f"{where}: column {f.name!r} has nulls")
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise ArtifactError(f"{where}: schema mismatch ({e})") from None


class Leases:
    """Leases on artifacts, so that concurrent runs on one store never compute the same cell twice.

    A lease is the object `leases/<artifact path>.lease` holding its owner and an expiry time. It is created
    exclusively (`Store.create`: one of two racing runs wins), renewed by a heartbeat thread while held, and
    deleted once the artifact is written. A run killed outright stops renewing: after `ttl_s` its leases expire
    and any run takes the work over. Expiry compares wall clocks, so nodes need roughly synchronised clocks
    (seconds, not minutes). In the one race leases do not close (two runs taking over the same expired lease
    at the same instant), both write the same deterministic cell atomically: the result is still one valid cell.
    """

    def __init__(self, store: Store, owner: str | None = None, ttl_s: float | None = None):
        self.store, self.owner = store, owner or uuid.uuid4().hex[:12]
        self.ttl_s = ttl_s or store.lease_ttl_s
        self.held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> Leases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rel(self, rel: str) -> str:
        return f"{LEASES_DIR}/{rel}.lease"

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.ttl_s}).encode()

    def holder(self, rel: str) -> dict | None:
        try:
            return json.loads(self.store.read_bytes(self._rel(rel)))
        except (FileNotFoundError, ValueError):
            return None

    def free(self, rel: str) -> bool:
        """Nobody holds rel, or its holder's lease expired (a peek; `acquire` decides)."""
        cur = self.holder(rel)
        return cur is None or cur.get("expires", 0) <= time.time()

    def acquire(self, rel: str) -> bool:
        """Take the lease on rel if nobody holds it or its holder's lease expired."""
        for _ in range(2):
            try:
                self.store.create(self._rel(rel), self._body())
            except FileExistsError:
                cur = self.holder(rel)
                if cur is not None and cur.get("expires", 0) > time.time():
                    return False
                if cur is not None:
                    log.warning("lease on %s held by %s expired: taking the work over", rel, cur.get("owner"))
                    self.store.delete(self._rel(rel))
                continue
            with self._lock:
                self.held.add(rel)
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

    def release(self, rel: str) -> None:
        with self._lock:
            self.held.discard(rel)
        cur = self.holder(rel)
        if cur is not None and cur.get("owner") == self.owner:
            self.store.delete(self._rel(rel))

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
                        self.store.write_bytes(self._rel(rel), self._body())
                    except OSError as e:  # the store is down: the next beat tries again, before the ttl runs out
                        log.warning("lease heartbeat for %s failed: %s", rel, e)

    def close(self) -> None:
        """Stop renewing and give back every lease still held (a failed stage frees its work for others)."""
        self._stop.set()
        for rel in list(self.held):
            with contextlib.suppress(OSError):
                self.release(rel)


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
                leases.release(rel(k))
                computed.append(k)
        first = False
        settled = set(claimed) | set(by_others)
        rest = [k for k in pending if k not in settled]
        pending = [k for k in rest if not done(k)]
        by_others += [k for k in rest if k not in pending]
        if pending and not claimed:
            log.info("waiting for %d artifact(s) leased by other runs", len(pending))
            time.sleep(poll_s)
    return computed, by_others


def cell_todo(store: Store, cells: Iterable[tuple[K, str]], schema: pa.Schema, fp: str) -> tuple[list[K], list[K],
                                                                                                  list[K]]:
    """Split cells (key, path) into (todo, done, repaired): `repaired` are in todo because the file there is
    broken (truncated, foreign schema...); each is logged, then recomputed over."""
    todo, done, repaired = [], [], []
    for key, rel in cells:
        why = store.check_cell(rel, schema, fp)
        if why is None:
            done.append(key)
            continue
        if why != "missing":
            log.warning("%s is invalid (%s): recomputing it", store.uri(rel), why)
            repaired.append(key)
        todo.append(key)
    return todo, done, repaired
