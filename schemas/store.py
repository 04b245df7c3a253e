"""The artifact store: a local directory or s3://bucket/prefix, with atomic writes and validating reads.

Writes are atomic: locally a temp file in the same directory is renamed over the target; on S3 an object only
becomes visible when its single PUT (or multipart upload) completes. So a reader sees a whole cell or none.

A remote store retries every call that fails because the endpoint is unreachable (exponential backoff, a
budget of `retries` attempts), then fails with `StoreUnavailable` naming the operation. Concurrent runs
coordinate through leases (`schemas/leases.py`): each cell is computed by one run, the others wait for it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVar

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.artifacts import SCHEMA_VERSION
from schemas.errors import ArtifactError, StoreUnavailable

META_KEY = b"zooter"

log = logging.getLogger("zooter.store")


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


K = TypeVar("K", bound=Hashable)


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
