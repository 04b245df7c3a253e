"""The router: an HF encoder + a head with one logit per expert (or an ensemble of such heads), its loss, and
loading for inference.

Interface (as small as RouteLLM's): `Router.probs(texts) -> (n, experts)` and `Router.route(texts) -> names`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

# transformers is imported inside the functions that load an encoder: Ray Train's controller and workers import
# this module (through cluster.train) for every fit, and a head-only fit never needs it (~3 s per process).
from cluster import models
from schemas.artifacts import ROUTER_ENCODER, ROUTER_JSON, ROUTER_WEIGHTS, router_file
from schemas.config import RouterConfig
from schemas.errors import ZooterError


class RouterError(ZooterError):
    """A router cannot be loaded or used; the message says which file or value."""


def pool(h: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return h[:, 0]
    m = attention_mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


class RouterHead(nn.Module):
    """pooled vector -> [standardise] -> linear, or one GELU hidden layer -> one logit per expert; with `heads` > 1,
    that many independently initialised heads whose probabilities are averaged (an ensemble).

    `standardize` adds fixed per-dimension mean/std buffers (set from the training embeddings when the encoder is
    frozen): a frozen encoder's raw features are badly scaled for a small head. `sigmoid`: each logit is an
    expert's own success probability (router.loss `bce`), so an ensemble averages sigmoids, not softmaxes.
    Trained alone on cached embeddings when the encoder is frozen; its state_dict keys are the same inside a
    RouterModel, and one head keeps the keys (`head.*`) of routers saved before ensembles existed."""

    def __init__(self, dim: int, n_experts: int, head_hidden: int = 0, dropout: float = 0.1,
                 standardize: bool = False, heads: int = 1, sigmoid: bool = False):
        super().__init__()
        self.standardize, self.sigmoid = standardize, sigmoid
        if standardize:
            self.register_buffer("feat_mean", torch.zeros(dim))
            self.register_buffer("feat_std", torch.ones(dim))

        def one() -> nn.Module:
            return nn.Linear(dim, n_experts) if head_hidden == 0 else nn.Sequential(
                nn.Linear(dim, head_hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(head_hidden, n_experts))

        if heads == 1:
            self.head = one()
        else:
            self.heads = nn.ModuleList(one() for _ in range(heads))

    def member_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """(heads, n, experts): every head's own logits (what training fits, head by head)."""
        if self.standardize:
            feats = (feats - self.feat_mean) / self.feat_std
        if hasattr(self, "head"):
            return self.head(feats).unsqueeze(0)
        return torch.stack([h(feats) for h in self.heads])

    def head_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """(n, experts) logits whose softmax is the router's probabilities: one softmax head's own logits, else
        the log of the heads' mean probability (softmax, or sigmoid normalised over experts)."""
        z = self.member_logits(feats).float()
        if z.shape[0] == 1 and not self.sigmoid:
            return z[0]
        logp = F.logsigmoid(z) if self.sigmoid else F.log_softmax(z, -1)
        return torch.logsumexp(logp, 0) - math.log(z.shape[0])

    def forward(self, feats: torch.Tensor, members: bool = False) -> torch.Tensor:
        return self.member_logits(feats) if members else self.head_logits(feats)


class RouterModel(RouterHead):
    """encoder -> pooled vector -> RouterHead."""

    def __init__(self, encoder: nn.Module, n_experts: int, pooling: str = "mean", head_hidden: int = 0,
                 dropout: float = 0.1, standardize: bool = False, heads: int = 1, sigmoid: bool = False):
        super().__init__(encoder.config.hidden_size, n_experts, head_hidden, dropout, standardize, heads, sigmoid)
        self.encoder = encoder
        self.pooling = pooling

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(h, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, members: bool = False) -> torch.Tensor:
        feats = self.features(input_ids, attention_mask)
        return self.member_logits(feats) if members else self.head_logits(feats)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def load_encoder(path: Path) -> nn.Module:
    """A shipped encoder's weights. A checkpoint without the encoder's pooler (multilingual-e5-small's conversion)
    leaves the pooler randomly initialised: harmless, since `pool` reads the token states and never the pooler, so
    that is not reported (transformers would print a load report on every load); any other missing or mismatched
    weight is an error."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    # The load report's logger drops warnings for this load only: a filter, since setting its level to WARNING or
    # above makes transformers log another check (tensor-parallel plans) on another logger.
    report = logging.getLogger("transformers.modeling_utils")
    report.addFilter(_errors_only)
    bar = hf_logging.is_progress_bar_enabled()  # a "Loading weights" bar on stderr at every (re)load of a router
    hf_logging.disable_progress_bar()
    try:
        # mismatched shapes: reported below (transformers would raise pointing at the report it was told not to print)
        enc, info = AutoModel.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True)
    finally:
        report.removeFilter(_errors_only)
        if bar:
            hf_logging.enable_progress_bar()
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
    if missing or info["mismatched_keys"]:
        raise RouterError(f"{path}: the encoder checkpoint lacks weights {missing} or has mismatched shapes "
                          f"{sorted(k for k, *_ in info['mismatched_keys'])}")
    return enc


def build(encoder_ref: str, n_experts: int, pooling: str, head_hidden: int = 0, dropout: float = 0.1,
          standardize: bool = False, expect: str | None = None, heads: int = 1,
          sigmoid: bool = False) -> tuple[RouterModel, object]:
    """A fresh router on an encoder; `expect` is the encoder identity the driver fingerprinted (models.resolve)."""
    from transformers import AutoTokenizer

    path = models.resolve(encoder_ref, expect=expect)
    tok = AutoTokenizer.from_pretrained(path)
    return RouterModel(load_encoder(path), n_experts, pooling, head_hidden, dropout, standardize, heads,
                       sigmoid), tok


def build_from_config(cfg: RouterConfig, n_experts: int) -> tuple[RouterModel, object]:
    """A router as its RouterConfig describes it (a frozen encoder's head standardises its features)."""
    return build(cfg.encoder, n_experts, cfg.pooling, cfg.head_hidden, cfg.dropout, cfg.freeze_encoder,
                 heads=cfg.heads, sigmoid=cfg.loss == "bce")


@torch.inference_mode()
def embed_texts(model: RouterModel, tok, texts: list[str], max_length: int, prefix: str = "",
                batch_size: int = 32, progress=None,
                encode: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Pooled encoder features (n, hidden), batched by length so padding stays small. `encode(input_ids,
    attention_mask)` computes a batch's features in place of `model.features` (the ONNX Runtime graph)."""
    model.eval()
    if encode is None:
        dev = next(model.parameters()).device

        def encode(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            return model.features(torch.from_numpy(ids).to(dev), torch.from_numpy(mask).to(dev)).float().cpu().numpy()

    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.encoder.config.hidden_size), dtype=np.float32)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tok([prefix + texts[j] for j in idx], return_tensors="np", padding=True, truncation=True,
                  max_length=max_length)
        out[idx] = encode(enc["input_ids"], enc["attention_mask"])
        if progress is not None:
            progress(len(idx))
    return out


def loss_fn(logits: torch.Tensor, target: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Batch-mean loss between router distribution p = softmax(logits) and target distribution s*; logits of
    shape (heads, n, experts) give the mean over heads (each head is fitted on its own).

    kl: KL(s* || p) = sum s* (log s* - log p)  (the paper's distillation; 0 log 0 = 0)
    kl_reverse: KL(p || s*) = sum p (log p - log s*)  (s* clamped at 1e-8)
    hard: cross-entropy on argmax s*
    bce: per-expert binary cross-entropy of sigmoid(logit_i) against target_i in [0, 1] (each expert's success)
    """
    if logits.dim() == 3:
        return torch.stack([loss_fn(z, target, kind) for z in logits]).mean()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum") / len(target)
    logp = F.log_softmax(logits.float(), dim=-1)
    if kind == "kl":
        return F.kl_div(logp, target, reduction="batchmean")
    if kind == "kl_reverse":
        p = logp.exp()
        return (p * (logp - target.clamp(min=1e-8).log())).sum(-1).mean()
    if kind == "hard":
        return F.nll_loss(logp, target.argmax(-1))
    raise ValueError(f"router.loss: unknown loss {kind!r}; choose one of ['kl', 'kl_reverse', 'hard', 'bce']")


def save(model: RouterModel, tok, cfg: RouterConfig, out: Path, meta: dict) -> None:
    """A router directory: encoder config + tokenizer, weights in one safetensors file, and the metadata file
    (`meta` plus `config`, the RouterConfig it was built from).

    With a frozen encoder only the head is saved, and `meta["encoder_identity"]` pins the shipped encoder the
    head was trained on (loading checks it): a fine-tuned one is saved whole."""
    out.mkdir(parents=True, exist_ok=True)
    model.encoder.config.save_pretrained(out / ROUTER_ENCODER)
    tok.save_pretrained(out / ROUTER_ENCODER)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not (cfg.freeze_encoder and k.startswith("encoder."))}
    save_file(state, str(out / ROUTER_WEIGHTS))
    (out / ROUTER_JSON).write_text(json.dumps({**meta, "config": cfg.model_dump(mode="json")}, indent=2))


# A served text is cut to max_length x CHARS_PER_TOKEN characters before tokenisation (Router.max_chars): the
# shipped encoders' tokens are a few characters each (a word longer than WordPiece's 100 characters is one [UNK]),
# so the cut changes no decision short of text made to defeat it, and bounds a decision's tokenising.
CHARS_PER_TOKEN = 64
# A forward's fixed cost in tokens of compute, per runtime, for `length_batches` in Router.features: texts of
# different lengths share a forward (padded) only where that costs less than another forward. Torch's eager forward
# has a fixed cost (dispatch, weight reads) that batching spreads: 32 served requests per call route 1.4x as fast as
# one at a time (benchmarks/serving.py, (c)). ONNX Runtime has none worth padding for: on 2 cores a 64-token RouterDC
# question takes 30.9, 33.0 and 34.5 ms a text at batch 1, 8 and 32 (e5-small, int8), so only texts of equal
# length share a forward.
FORWARD_TOKENS = {"torch": 64.0, "onnx": 0.0}

Quantize = Literal["int8"]  # what `Router(quantize=...)` and `zooter gateway --quantize` take
Runtime = Literal["torch", "onnx", "auto"]  # what `Router(runtime=...)` and `zooter gateway --runtime` take
# What runtime="auto" checks ONNX Runtime's float32 probabilities against torch's on, at load
PROBES = ["What is 17 times 23?", "Write a haiku about the sea.", "请把这句话翻译成英语：今天天气很好。",
          "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n# what does fib(10) return?" * 4]
PROBE_ATOL = 1e-4


class Router:
    """A trained router loaded for inference: `probs(texts)`, `route(texts)`; `config` is its RouterConfig.

    `quantize="int8"` (CPU only, opt-in): the encoder's linear layers run as dynamically quantised int8 (weights int8,
    activations quantised per call): a served decision is faster, and its features, hence a few decisions, differ
    from the trained router's (benchmarks/serving.py measures both). The head stays float32.

    `runtime="onnx"` (CPU only, opt-in): the encoder runs in ONNX Runtime (cluster/onnx_encoder.py), exported once
    and cached; float32 gives the same features to ~1e-6, 1.7-2x faster at batch 1; with `quantize="int8"` its
    MatMuls are int8 (ORT's dynamic quantisation, not torch's): the fastest served decision.

    `runtime="auto"` (the gateway's default): ONNX Runtime on CPU when it loads and, in float32, gives torch's
    probabilities on PROBES (to PROBE_ATOL, decisions equal), else torch; `runtime` then says which it is."""

    def __init__(self, directory: str | Path, device: str | None = None, quantize: Quantize | None = None,
                 runtime: Runtime = "torch"):
        d = Path(directory)
        if not (d / ROUTER_JSON).is_file():
            raise RouterError(f"{d}: not a router directory (no {ROUTER_JSON})")
        self.meta = json.loads((d / ROUTER_JSON).read_text())
        try:
            self.config = RouterConfig.model_validate(self.meta.get("config"))
        except ValidationError as e:
            err = e.errors()[0]
            raise RouterError(f"{d / ROUTER_JSON}: not a valid router config ({'.'.join(map(str, err['loc']))}: "
                              f"{err['msg']}); retrain the router") from None
        self.experts: list[str] = self.meta["experts"]
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(d / ROUTER_ENCODER)
        cfg = self.config
        if cfg.freeze_encoder:  # the head was trained on this exact shipped encoder: load it, and check it
            if models.identity(cfg.encoder) != self.meta.get("encoder_identity"):
                raise RouterError(f"{d}: encoder {cfg.encoder} differs from the one this router was trained on")
            enc = load_encoder(models.resolve(cfg.encoder))
        else:
            enc = AutoModel.from_config(AutoConfig.from_pretrained(d / ROUTER_ENCODER))
        self.model = RouterModel(enc, len(self.experts), cfg.pooling, cfg.head_hidden, cfg.dropout,
                                 cfg.freeze_encoder, cfg.heads, cfg.loss == "bce")
        self.model.load_state_dict(load_file(str(d / ROUTER_WEIGHTS)), strict=not cfg.freeze_encoder)
        self.model.to(self.device).eval()
        self.quantized: Quantize | None = None
        self.onnx = None
        if runtime == "auto":
            runtime = self._auto(d, quantize)
        self.runtime: Runtime = runtime
        if runtime == "onnx" and self.onnx is None:
            self._to_onnx(d, quantize)
        elif runtime == "torch" and quantize is not None:
            self._quantize(quantize)

    def _auto(self, d: Path, quantize: Quantize | None) -> Runtime:
        """"onnx" when ONNX Runtime serves this router on this device as torch would, else "torch"."""
        if self.device != "cpu":
            return "torch"
        want = None if quantize else self.probs(PROBES)  # the torch encoder's (before the graph replaces it)
        try:
            self._to_onnx(d, quantize)
        except Exception as e:  # noqa: BLE001 - an encoder ONNX cannot take is served by torch
            logging.getLogger(__name__).warning("router %s: ONNX Runtime unavailable (%s: %s); serving with torch",
                                                d.name, type(e).__name__, e)
            self.onnx = self.quantized = None
            return "torch"
        if want is not None and not np.allclose(self.probs(PROBES), want, rtol=0, atol=PROBE_ATOL):
            logging.getLogger(__name__).warning("router %s: ONNX Runtime's probabilities differ from torch's; "
                                                "serving with torch", d.name)
            self.onnx = None
            return "torch"
        return "onnx"

    def _to_onnx(self, d: Path, quantize: Quantize | None) -> None:
        if self.device != "cpu" or quantize not in (None, "int8"):
            raise RouterError(f"runtime 'onnx' with quantize {quantize!r} on {self.device}: CPU only, float32 or int8")
        from cluster.onnx_encoder import OnnxEncoder

        cfg = self.config
        # what fixes the graph: the shipped encoder's identity, or the fine-tuned encoder's weights file
        weights = (models.identity(cfg.encoder) if cfg.freeze_encoder
                   else hashlib.sha256((d / ROUTER_WEIGHTS).read_bytes()).hexdigest())
        key = hashlib.sha256(f"{weights}|{cfg.pooling}".encode()).hexdigest()[:20]
        self.onnx = OnnxEncoder.load_or_export(self.model.encoder, pool, cfg.pooling, key,
                                               "int8" if quantize else "float32")
        self.quantized = quantize

    def _quantize(self, kind: Quantize) -> None:
        if kind != "int8" or self.device != "cpu":
            raise RouterError(f"quantize {kind!r} on {self.device}: only int8 on CPU is supported")
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # torch deprecates quantised tensors (torchao replaces them); 2.13-2.14 run it
            warnings.simplefilter("ignore")
            self.model.encoder = quantize_dynamic(self.model.encoder, {nn.Linear}, dtype=torch.qint8)
        self.quantized = kind

    @classmethod
    def from_store(cls, store, router_fp: str, quantize: Quantize | None = None,
                   runtime: Runtime = "torch") -> Router:
        """Copy what inference needs (not the Ray Train checkpoints) out of a possibly remote store; load it.
        (`store` is a schemas.store.Store.)"""
        tmp = Path(tempfile.mkdtemp(prefix="zooter-router-"))
        try:
            for name in (ROUTER_JSON, ROUTER_WEIGHTS):
                store.fs.get(store.path(router_file(router_fp, name)), str(tmp / name))
            (tmp / ROUTER_ENCODER).mkdir()
            for name in store.ls(router_file(router_fp, ROUTER_ENCODER)):
                store.fs.get(store.path(router_file(router_fp, f"{ROUTER_ENCODER}/{name}")),
                             str(tmp / ROUTER_ENCODER / name))
            return cls(tmp, quantize=quantize, runtime=runtime)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @property
    def max_chars(self) -> int:
        """How much of a text a decision can read: `max_length` tokens, none shorter than a character and few
        longer than CHARS_PER_TOKEN of them. Texts are cut there before tokenisation (a 10 MB message was
        tokenised whole, about 10 s, for the 256 tokens the encoder reads)."""
        return self.config.max_length * CHARS_PER_TOKEN

    @torch.inference_mode()
    def probs(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """(len(texts), experts) probabilities. One text (a served request) takes a short path to the same numbers:
        one forward from tokens to probabilities, with no length sort, no `eval()` walk over every module, no round
        trip of the features through numpy (the model is in eval mode from loading on) and no attention mask: one
        text has no padding, and unmasked attention takes a faster kernel (e5-small: about 15 % of the call).
        Several texts go through `features` (batched by length)."""
        if self.onnx is not None or len(texts) != 1:
            return self.probs_from_features(self.features(texts, batch_size))
        ids = self.tok(self.config.prefix + texts[0][:self.max_chars], return_tensors="pt", truncation=True,
                       max_length=self.config.max_length)["input_ids"].to(self.device)
        h = self.model.encoder(input_ids=ids).last_hidden_state
        logits = self.model.head_logits(pool(h, torch.ones_like(ids), self.model.pooling))
        return torch.softmax(logits.float(), -1).cpu().numpy()

    @torch.inference_mode()
    def features(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """(len(texts), hidden) pooled encoder features: what the head reads (the baselines' feature space). Texts
        are cut to `max_chars`, tokenised once, and grouped by token length (`length_batches`: padding against a
        forward's fixed cost), so a served batch of short questions is not padded to its one long one."""
        from cluster.batches import length_batches

        out = np.zeros((len(texts), self.model.encoder.config.hidden_size), dtype=np.float32)
        if not texts:
            return out
        ids = self.tok([self.config.prefix + t[:self.max_chars] for t in texts], truncation=True,
                       max_length=self.config.max_length)["input_ids"]
        for idx in length_batches([len(x) for x in ids], batch_size,
                                  FORWARD_TOKENS["torch" if self.onnx is None else "onnx"]):
            enc = self.tok.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="np")
            out[idx] = self._encode(enc["input_ids"], enc["attention_mask"])
        return out

    def _encode(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.onnx is not None:
            return self.onnx.features(ids, mask)
        t, m = torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)
        return self.model.features(t, m).float().cpu().numpy()

    @torch.inference_mode()
    def probs_from_features(self, feats: np.ndarray) -> np.ndarray:
        """From pooled encoder features (the embed step's cells, for a router with a frozen encoder)."""
        if len(feats) == 0:
            return np.zeros((0, len(self.experts)))
        x = torch.as_tensor(feats, dtype=torch.float32, device=self.device)
        return torch.softmax(self.model.head_logits(x).float(), -1).cpu().numpy()

    def route(self, texts: list[str]) -> list[str]:
        return [self.experts[i] for i in self.probs(texts).argmax(-1)]
