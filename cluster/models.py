"""Model sources, resolved to local HF directories: which `Source` (cluster/sources.py) a reference names, and the
calls every step makes through it (`check_source`, `identity`, `resolve`, `architectures`). Nothing is downloaded
from a model hub.

- `packaged:<name>`: cluster/packaged.py (weights inside installed packages, verified, converted once).
- `s3://bucket/prefix/`, a Hugging Face repo id `org/name` with a pinned `revision`, or a local HF directory:
  cluster/sources.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from cluster.sources import (  # noqa: F401 - the names callers use
    MARKER,
    HubSource,
    LocalSource,
    ModelSourceError,
    S3Source,
    Source,
    cache_root,
    etag_of,
)
from schemas.config import HUB_ID

Kind = Literal["packaged", "s3", "hub", "local"]


def kind(ref: str) -> Kind:
    """Which source a reference names. A relative `org/name` that is not an existing directory is a hub id."""
    if ref.startswith("packaged:"):
        return "packaged"
    if ref.startswith("s3://"):
        return "s3"
    if ref.startswith("hf://") or (HUB_ID.match(ref) and not Path(ref).exists()):
        return "hub"
    return "local"


def source(ref: str, revision: str | None = None) -> Source:
    """The source a reference names (a `packaged:` one imports cluster/packaged.py, and only then)."""
    match kind(ref):
        case "packaged":
            from cluster.packaged import PackagedSource, packaged

            packaged(ref)  # an unknown name is an error here
            return PackagedSource(ref, revision)
        case "s3":
            return S3Source(ref, revision)
        case "hub":
            return HubSource(ref, revision)
    return LocalSource(ref, revision)


def check_source(ref: str, revision: str | None = None) -> None:
    """Cheap existence check (no hashing, no loading; one LIST for S3): used to fail fast before any model loads."""
    source(ref, revision).check()


def identity(ref: str, revision: str | None = None) -> str:
    """What identifies the weights, for fingerprints, without loading them: the verified sha256 for packaged
    models; `s3:` + a digest of the prefix's listing (keys, sizes, ETags); `hf:org/name@<commit>` for a hub id
    (its revision resolved in the local HF cache); for a local directory the revision given in the spec, else a
    digest of config.json and a sampled digest of every weight file."""
    return source(ref, revision).identity()


def resolve(ref: str, revision: str | None = None, expect: str | None = None) -> Path:
    """A local HF directory for a model reference (called where the model loads, e.g. inside an actor).

    `expect` is the identity the driver fingerprinted; a source whose identity differs here (objects changed
    since, another commit behind a ref, other files at this path on this node) is refused. S3 prefixes are
    copied once per node and identity; packaged GGUF weights are converted once (sha256-verified)."""
    return source(ref, revision).resolve(expect)


def architectures(ref: str, revision: str | None = None) -> tuple[list[str], int | None]:
    """(architectures, num_labels) of a model reference from its config.json only, no weights read.
    num_labels is None for packaged models (none is a classifier)."""
    src = source(ref, revision)
    if kind(ref) == "packaged":
        return [src.pk.architecture], None  # type: ignore[attr-defined]
    try:
        cfg = json.loads(src.config_json())
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"{ref}: unreadable config.json ({e})") from None
    archs = cfg.get("architectures") or []
    labels = cfg.get("id2label")  # what transformers saves; num_labels itself is derived from it
    return [str(a) for a in archs], len(labels) if isinstance(labels, dict) else int(cfg.get("num_labels", 2))
