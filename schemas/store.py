"""The artifact store: a local directory or s3://bucket/prefix, with atomic writes and validating reads.

Writes are atomic: locally a temp file in the same directory is renamed over the target; on S3 an object only
becomes visible when its single PUT (or multipart upload) completes. So a reader sees a whole cell or none.

A remote store retries every call that fails because the endpoint is unreachable (exponential backoff, a
budget of `retries` attempts), then fails with `StoreUnavailable` naming the operation. Concurrent runs
coordinate through leases (`schemas/leases.py`): each cell is computed by one run, the others wait for it.

Problems the user fixes are one line naming the store and the object, never a traceback: a URL without a bucket
or a file where the store's directory should be (at construction), a local store the OS refuses to write or read
(`StoreRejected`), a corrupted JSON record (`read_model`: ArtifactError saying how to repair it).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import errno
import functools
import io
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from schemas.artifacts import SCHEMA_VERSION
from schemas.errors import ArtifactError, ConfigError, StoreRejected, StoreUnavailable, ZooterError

META_KEY = b"zooter"
FOOTER_BYTES = 64 * 1024  # the tail read to find a cell's footer (cells' footers are a few KiB)
# Store calls made by this process, by operation ("exists", "read", "write", "create", "ls", "delete"): one per
# `Store._io` call, i.e. one filesystem call (on S3 one request, more for a multi-range Parquet read).
# benchmarks/scale.py reads it; a plain Counter (a lost increment under a thread race only skews a benchmark).
CALLS: collections.Counter[str] = collections.Counter()

log = logging.getLogger("zooter.store")
M = TypeVar("M", bound=BaseModel)


# What the user can do about each refusal, by errno.
_REPAIR = {errno.EACCES: "make it writable for this user or choose another store",
           errno.EPERM: "make it writable for this user or choose another store",
           errno.EROFS: "it is on a read-only filesystem: choose another store",
           errno.ENOTDIR: "a file is in the way of the store's folders: move it or choose another store",
           errno.ENOSPC: "the disk is full: free space or choose another store",
           errno.EDQUOT: "the disk quota is used up: free space or choose another store"}


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


def _botocore_config(options: dict[str, Any]) -> dict[str, Any]:
    """The S3 client's botocore config: the options' `config_kwargs`, with one quick retry of its own unless they
    set `retries`. The store's `retries`/`backoff_s` are the budget for an unreachable endpoint; botocore's default
    (legacy mode: 4 more attempts per call, backing off ~7 s on average, 15 s at worst) would run inside every one
    of those attempts. One retry (standard mode, under 1 s) still covers a dropped connection or a 5xx; s3fs retries
    S3's throttling (SlowDown) itself."""
    cfg = copy.deepcopy(options.get("config_kwargs") or {})  # botocore edits the dicts it is given
    cfg.setdefault("retries", {"mode": "standard", "total_max_attempts": 2})
    return cfg



def store_url_problem(url: str) -> str | None:
    """What is wrong with a store URL (None: nothing): empty, or a remote scheme without a bucket (`s3://`,
    `s3:///x`). Checked by `Store` (which `--store` options reach without a config) and by `StoreConfig`."""
    if not url.strip():
        return "must not be empty"
    scheme, sep, rest = url.partition("://")
    if sep and scheme != "file" and not rest.split("/", 1)[0]:
        return f"{url!r} names no bucket (use {scheme}://bucket/prefix)"
    return None


class Store:
    def __init__(self, url: str, options: dict[str, Any] | None = None, retries: int = 5, backoff_s: float = 1.0,
                 lease_ttl_s: float = 120.0, lease_wait_s: float = 1800.0, conditional_writes: bool = True):
        problem = store_url_problem(url)
        if problem:
            raise ConfigError(f"store {url!r}: {problem}")
        self.url = url.rstrip("/") or "/"
        self.options = dict(options or {})
        self.retries, self.backoff_s, self.lease_ttl_s = retries, backoff_s, lease_ttl_s
        self.lease_wait_s, self.conditional_writes = lease_wait_s, conditional_writes
        # Leases use If-Match writes (`replace`) on S3 only, where the endpoint honours them (schemas/leases.py)
        self.conditional = conditional_writes and self.url.startswith("s3://")
        remote = "://" in self.url and not self.url.startswith("file://")
        # Other processes (actors) write cells: a remote store must not answer from a stale listing cache.
        extra = {"use_listings_cache": False, "skip_instance_cache": True} if remote else {}
        options = dict(self.options)
        if self.url.startswith("s3://"):
            options["config_kwargs"] = _botocore_config(self.options)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **extra, **options)
        self.local = not remote
        if self.local:
            self._not_a_file()

    def _existing(self) -> Path:
        """The store's directory, or its nearest ancestor that exists (local stores)."""
        p = Path(self.root)
        while not p.exists() and p != p.parent:
            p = p.parent
        return p

    def _not_a_file(self) -> None:
        p = self._existing()
        if not p.is_dir():
            where = "" if str(p) == self.root else f" ({p} is in the way)"
            raise StoreRejected(f"store {self.url}: a file, not a directory{where}; give a directory (it is created "
                                "when missing)")

    def check_writable(self) -> None:
        """Fail now, naming the store, when a local store cannot be written (read-only filesystem, no permission):
        what preflight calls so a run is refused before any model loads. Remote stores are checked by use."""
        if not self.local:
            return
        self._not_a_file()
        p = self._existing()
        if not os.access(p, os.W_OK | os.X_OK):  # also false for root on a read-only filesystem
            code = errno.EROFS if _read_only(p) else errno.EACCES
            raise StoreRejected(f"store {self.url}: {p} is not writable ({os.strerror(code)}); {_REPAIR[code]}")

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @classmethod
    def from_config(cls, cfg: Any) -> Store:
        """From a `schemas.config.StoreConfig`."""
        return cls(cfg.url, cfg.options, cfg.retries, cfg.backoff_s, cfg.lease_ttl_s, cfg.lease_wait_s,
                   cfg.conditional_writes)

    def __getstate__(self) -> dict:  # picklable for Ray actors: rebuild the filesystem there
        return {"url": self.url, "options": self.options, "retries": self.retries, "backoff_s": self.backoff_s,
                "lease_ttl_s": self.lease_ttl_s, "lease_wait_s": self.lease_wait_s,
                "conditional_writes": self.conditional_writes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _io(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Call fn, retrying with exponential backoff while a remote endpoint is unreachable. Locally, the OS
        refusing the call is a StoreRejected naming the store (not-found and already-exists keep their meaning)."""
        CALLS[what.partition(" ")[0]] += 1
        if self.local:
            try:
                return fn(*args, **kw)
            except (FileNotFoundError, FileExistsError):
                raise
            except OSError as e:
                if e.errno is None:  # not the OS refusing: e.g. pyarrow's IO errors on a corrupted file
                    raise
                raise self._rejected(what, e) from None
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

    def _rejected(self, what: str, e: OSError) -> StoreRejected:
        where = f": {e.filename}" if e.filename else ""
        why = e.strerror or str(e)
        fix = _REPAIR.get(e.errno or 0, "check the store's folder")
        return StoreRejected(f"store {self.url}: cannot {what} ({why}{where}); {fix}")

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

    def delete_many(self, rels: list[str]) -> None:
        """Delete objects, missing ones ignored: on S3 one request per 1000 (DeleteObjects), locally one by one."""
        if not rels:
            return
        if self.local:
            for rel in rels:
                self.delete(rel)
            return
        with contextlib.suppress(FileNotFoundError):
            self._io(f"delete {len(rels)} objects", self.fs.rm, [self.path(r) for r in rels])

    # --- atomic writes -------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.local:
            self._io(f"write {rel}", self._put_local, self.path(rel), data, os.replace)
        else:
            self._io(f"write {rel}", self.fs.pipe_file, self.path(rel), data)

    def create(self, rel: str, data: bytes) -> str | None:
        """Write rel only if it does not exist yet (atomically: one of two racing writers wins); else
        FileExistsError. Locally a hard link of a complete temp file; on S3 a conditional PUT (If-None-Match: *).
        Returns the new object's ETag on S3 (what `replace` takes), None locally."""
        if self.local:  # link fails with FileExistsError when target exists
            self._io(f"create {rel}", self._put_local, self.path(rel), data, os.link)
            return None
        out = self._io(f"create {rel}", self.fs.pipe_file, self.path(rel), data, mode="create")
        return out.get("ETag") if isinstance(out, dict) else None

    def replace(self, rel: str, data: bytes, etag: str) -> str | None:
        """Overwrite rel only if it is still the object with this ETag (S3 `If-Match`): its new ETag, or None when
        the object changed or went meanwhile. S3 only: what leases renew, release and take over with."""
        try:
            out = self._io(f"create {rel}", self.fs.pipe_file, self.path(rel), data, IfMatch=etag)
        except FileNotFoundError:
            return None
        except OSError as e:
            if _precondition_failed(e):
                return None
            raise
        return out.get("ETag") if isinstance(out, dict) else None

    def delete_if(self, rel: str, etag: str) -> bool:
        """Delete rel only if it is still the object with this ETag (S3 `If-Match` on DeleteObject): whether it was."""
        bucket, key, _ = self.fs.split_path(self.path(rel))
        try:
            self._io(f"delete {rel}", self.fs.call_s3, "delete_object", Bucket=bucket, Key=key, IfMatch=etag)
        except FileNotFoundError:
            return False
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
        return True

    def read_stamped(self, rel: str) -> tuple[bytes, float, str]:
        """(content, modification time by the store's clock in epoch seconds, ETag) of one object, in one request;
        FileNotFoundError when missing. Locally the ETag is inode, size and mtime in ns (it changes with a
        rewrite). On S3 the time has whole seconds (Last-Modified)."""
        if self.local:
            def read(path: str) -> tuple[bytes, float, str]:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    return f.read(), st.st_mtime, f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"
            return self._io(f"read {rel}", read, self.path(rel))
        bucket, key, _ = self.fs.split_path(self.path(rel))

        async def get() -> tuple[bytes, float, str]:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                body = await resp["Body"].read()
            finally:
                resp["Body"].close()
            return body, resp["LastModified"].timestamp(), resp["ETag"]

        return self._io(f"read {rel}", fsspec.asyn.sync, self.fs.loop, get)

    def list_stamped(self, rel: str) -> dict[str, tuple[float, str]]:
        """Every object under the folder rel, at any depth: path relative to rel -> (modification time, ETag).
        On S3 one request per 1000 objects."""
        try:
            found = self._io(f"ls {rel}", self.fs.find, self.path(rel), detail=True)
        except FileNotFoundError:
            return {}
        base = self.path(rel).rstrip("/") + "/"
        out = {}
        for p, info in found.items():
            p = p if not self.local else str(p)
            name = p[len(base):] if p.startswith(base) else p.removeprefix(base.lstrip("/"))
            if self.local:
                st = os.stat(p)
                out[name] = (st.st_mtime, f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}")
            else:
                out[name] = (info["LastModified"].timestamp(), info.get("ETag", ""))
        return out

    @staticmethod
    def _put_local(target: str, data: bytes, publish: Callable[[str, str], None]) -> None:
        """Write a complete, fsynced temp file beside target, then publish it (rename or link) in one step."""
        d = os.path.dirname(target)
        try:
            os.makedirs(d, exist_ok=True)
        except FileExistsError:  # a file where a folder belongs: not "the target exists", which `create` means
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), d) from None
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

    def read_model(self, rel: str, model: type[M], bad: str) -> M:
        """A JSON record validated as `model`. Missing, not JSON or not that model is one ArtifactError naming the
        object; `bad` says what an invalid one is and how to repair it, with `{why}` where the reason goes."""
        try:
            return model.model_validate_json(self.read_bytes(rel))
        except FileNotFoundError:
            raise ArtifactError(f"{self.uri(rel)}: missing") from None
        except ValidationError as e:
            err = e.errors()[0]
            why = f"{'.'.join(map(str, err['loc']))}: {err['msg']}" if err["loc"] else err["msg"]
            raise ArtifactError(f"{self.uri(rel)}: {bad.format(why=' '.join(why.split()))}") from None

    def _parquet(self, rel: str, read: Callable[..., Any]) -> Any:
        try:
            if self.local:
                return self._io(f"read {rel}", read, self.path(rel), filesystem=self.fs)
            # One ranged GET of the whole object (a path handed to pyarrow costs a HEAD, then a GET per range)
            data = self._io(f"read {rel}", self.fs.cat_file, self.path(rel), start=0)
            return read(pa.BufferReader(data))
        except FileNotFoundError:
            raise ArtifactError(f"{self.uri(rel)}: missing") from None
        except ZooterError:  # unreachable (remote) or refused (local): already one line naming the store
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

    def _footer(self, rel: str) -> pa.Schema:
        """The cell's schema from one read of the file's tail (FileNotFoundError: no file there): a missing cell
        costs one request, not an exists check (on S3 a HEAD, then a LIST) before the footer's reads."""
        try:
            tail = self._io(f"read {rel}", self.fs.cat_file, self.path(rel), start=-FOOTER_BYTES)
        except FileNotFoundError:
            raise
        except ZooterError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. an empty object's range: a broken cell
            raise ArtifactError(f"{self.uri(rel)}: unreadable Parquet ({e})") from None
        if len(tail) >= 8 and tail[-4:] == b"PAR1" and int.from_bytes(tail[-8:-4], "little") + 8 > len(tail):
            return self.read_schema(rel)  # a footer longer than the tail read: read it as a whole
        try:
            return pq.read_schema(pa.BufferReader(tail))
        except Exception as e:  # noqa: BLE001 - any parse error means a broken cell
            raise ArtifactError(f"{self.uri(rel)}: unreadable Parquet ({e})") from None

    def cell(self, rel: str, schema: pa.Schema, fingerprint: str) -> tuple[str | None, dict]:
        """(None, the cell's metadata) when the cell is done: it exists, its footer parses, its schema matches and
        it names our fingerprint. Otherwise (why not: "missing", or what is wrong with the file there, {})."""
        try:
            got = self._footer(rel)
        except FileNotFoundError:
            return "missing", {}
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
        """A lazy Polars frame over cells. Local cells stream from disk. Remote cells are fetched with one GET
        each, concurrently, and held in memory: a pyarrow dataset over fsspec cost 2 HEAD + 1 GET per cell for each
        scan, about 10 requests per score cell in a label run's tail (benchmarks/scale.py)."""
        paths = [self.path(r) for r in rels]
        if self.local:
            return pl.scan_parquet(paths)
        if not paths:
            return pl.from_arrow(pa.table({})).lazy()
        try:
            blobs = self._io(f"read {len(paths)} cells", self.fs.cat_ranges, paths, [0] * len(paths),
                             [None] * len(paths), on_error="raise")
        except FileNotFoundError:
            missing = next((r for r in rels if not self.exists(r)), rels[0])
            raise ArtifactError(f"{self.uri(missing)}: missing") from None
        try:
            tables = [pq.read_table(pa.BufferReader(b)) for b in blobs]
        except Exception as e:  # noqa: BLE001 - any parse error means a broken cell
            raise ArtifactError(f"{self.url}: unreadable Parquet among {len(paths)} cells ({e})") from None
        return pl.from_arrow(pa.concat_tables(tables)).lazy()


def _precondition_failed(e: OSError) -> bool:
    """s3fs's translation of S3's 412 PreconditionFailed (an If-Match that no longer matches)."""
    return e.errno == errno.EINVAL and "precondition" in str(e).lower()


def _read_only(p: Path) -> bool:
    return bool(os.statvfs(p).f_flag & os.ST_RDONLY)


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
    broken (truncated, foreign schema...); each is logged, then recomputed over. A valid cell whose metadata
    counts failed rows (`failed`, written only when some row failed alone) is in todo too: each run retries them.

    One listing per folder tells which cells are there at all; only those are read (their footers), so planning
    a fresh stage costs a request per folder, not per cell."""
    todo, done, repaired = [], [], []
    cells = list(cells)
    listed: dict[str, set[str]] = {}
    for _, rel in cells:
        folder = posixpath.dirname(rel)
        if folder not in listed:
            listed[folder] = set(store.ls(folder)) if folder else set()
    for key, rel in cells:
        folder, name = posixpath.split(rel)
        if folder and name not in listed[folder]:
            todo.append(key)
            continue
        why, meta = store.cell(rel, schema, fp)
        if why is None and not meta.get("failed"):
            done.append(key)
            continue
        if why is None:  # rows failed alone in it (tasks/generate.py, tasks/score.py): retried, the cell with them
            log.info("%s has %d failed rows: computing it again", store.uri(rel), meta["failed"])
            todo.append(key)
            continue
        if why != "missing":
            log.warning("%s is invalid (%s): recomputing it", store.uri(rel), why)
            repaired.append(key)
        todo.append(key)
    return todo, done, repaired
