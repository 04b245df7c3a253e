"""The artifact store: a local directory or s3://bucket/prefix, with atomic writes and validating reads.

Writes are atomic: locally a temp file in the same directory is renamed over the target; on S3 an object only
becomes visible when its single PUT (or multipart upload) completes. So a reader sees a whole cell or none.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.artifacts import SCHEMA_VERSION

META_KEY = b"zooter"


class ArtifactError(ValueError):
    """An artifact is missing, unreadable or does not match its schema."""


class Store:
    def __init__(self, url: str, options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.options = dict(options or {})
        remote = "://" in self.url and not self.url.startswith("file://")
        # Other processes (actors) write cells: a remote store must not answer from a stale listing cache.
        extra = {"use_listings_cache": False, "skip_instance_cache": True} if remote else {}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **extra, **self.options)
        self.local = not remote

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __getstate__(self) -> dict:  # picklable for Ray actors: rebuild the filesystem there
        return {"url": self.url, "options": self.options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["options"])

    def path(self, rel: str) -> str:
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ArtifactError(f"unsafe store path {rel!r}")
        return posixpath.join(self.root, rel)

    def uri(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def ls(self, rel: str) -> list[str]:
        """Names directly under rel (empty when it does not exist)."""
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path(rel), detail=False))
        except FileNotFoundError:
            return []

    # --- atomic writes -------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        if self.local:
            d = os.path.dirname(target)
            os.makedirs(d, exist_ok=True)
            tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}-{os.path.basename(target)}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            self.fs.pipe_file(target, data)

    def write_table(self, rel: str, table: pa.Table, schema: pa.Schema, meta: dict | None = None) -> None:
        table = conform(table, schema, rel)
        md = {META_KEY: json.dumps({"schema_version": SCHEMA_VERSION, **(meta or {})}, default=str).encode()}
        table = table.replace_schema_metadata(md)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(rel, buf.getvalue())

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=False, default=str).encode())

    # --- validating reads ----------------------------------------------------------------------------
    def read_json(self, rel: str) -> Any:
        with self.fs.open(self.path(rel), "rb") as f:
            return json.load(f)

    def read_meta(self, rel: str) -> dict:
        """The cell's key-value metadata, read from the Parquet footer only."""
        try:
            md = pq.read_schema(self.path(rel), filesystem=self.fs).metadata or {}
        except FileNotFoundError:
            raise ArtifactError(f"{self.uri(rel)}: missing") from None
        except Exception as e:  # noqa: BLE001 - any parse error means a broken cell
            raise ArtifactError(f"{self.uri(rel)}: unreadable Parquet ({e})") from None
        return json.loads(md.get(META_KEY, b"{}"))

    def read_table(self, rel: str, schema: pa.Schema) -> pa.Table:
        try:
            table = pq.read_table(self.path(rel), filesystem=self.fs)
        except FileNotFoundError:
            raise ArtifactError(f"{self.uri(rel)}: missing") from None
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"{self.uri(rel)}: unreadable Parquet ({e})") from None
        return conform(table, schema, self.uri(rel))

    def valid_cell(self, rel: str, schema: pa.Schema, fingerprint: str) -> bool:
        """A cell is done when it exists, its footer parses, its schema matches and it names our fingerprint."""
        if not self.exists(rel):
            return False
        try:
            meta = self.read_meta(rel)
            got = pq.read_schema(self.path(rel), filesystem=self.fs)
        except ArtifactError:
            return False
        return meta.get("fingerprint") == fingerprint and _same_fields(got, schema)

    def arrow_fs(self) -> pafs.FileSystem:
        """This store's filesystem for pyarrow users (Ray Train checkpoints): same endpoint and credentials."""
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def scan(self, rels: list[str]) -> pl.LazyFrame:
        """A lazy Polars frame over cells (streams; works for local and remote stores)."""
        paths = [self.path(r) for r in rels]
        if self.local:
            return pl.scan_parquet(paths)
        return pl.scan_pyarrow_dataset(pads.dataset(paths, filesystem=self.fs, format="parquet"))


def _same_fields(got: pa.Schema, want: pa.Schema) -> bool:
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
