"""The router: an HF encoder + a linear head with one logit per expert, its loss, and loading for inference.

Interface (as small as RouteLLM's): `Router.probs(texts) -> (n, experts)` and `Router.route(texts) -> names`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from cluster import models


class RouterError(ValueError):
    """A router cannot be loaded or used; the message says which file or value."""


class RouterModel(nn.Module):
    def __init__(self, encoder: nn.Module, n_experts: int, pooling: str = "mean"):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.head = nn.Linear(encoder.config.hidden_size, n_experts)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.head(pooled)


def build(encoder_ref: str, n_experts: int, pooling: str) -> tuple[RouterModel, object]:
    path = models.resolve(encoder_ref)
    tok = AutoTokenizer.from_pretrained(path)
    return RouterModel(AutoModel.from_pretrained(path), n_experts, pooling), tok


def loss_fn(logits: torch.Tensor, target: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Batch-mean loss between router distribution p = softmax(logits) and target distribution s*.

    kl: KL(s* || p) = sum s* (log s* - log p)  (the paper's distillation; 0 log 0 = 0)
    kl_reverse: KL(p || s*) = sum p (log p - log s*)  (s* clamped at 1e-8)
    hard: cross-entropy on argmax s*
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    if kind == "kl":
        return F.kl_div(logp, target, reduction="batchmean")
    if kind == "kl_reverse":
        p = logp.exp()
        return (p * (logp - target.clamp(min=1e-8).log())).sum(-1).mean()
    if kind == "hard":
        return F.nll_loss(logp, target.argmax(-1))
    raise ValueError(f"router.loss: unknown loss {kind!r}; choose one of ['kl', 'kl_reverse', 'hard']")


def save(model: RouterModel, tok, out: Path, meta: dict) -> None:
    """A router directory: encoder config + tokenizer, all weights in one safetensors file, router.json."""
    out.mkdir(parents=True, exist_ok=True)
    model.encoder.config.save_pretrained(out / "encoder")
    tok.save_pretrained(out / "encoder")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "router.safetensors"))
    (out / "router.json").write_text(json.dumps(meta, indent=2))


class Router:
    def __init__(self, directory: str | Path, device: str | None = None):
        d = Path(directory)
        if not (d / "router.json").is_file():
            raise RouterError(f"{d}: not a router directory (no router.json)")
        self.meta = json.loads((d / "router.json").read_text())
        self.experts: list[str] = self.meta["experts"]
        self.max_length = int(self.meta["max_length"])
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(d / "encoder")
        enc = AutoModel.from_config(AutoConfig.from_pretrained(d / "encoder"))
        self.model = RouterModel(enc, len(self.experts), self.meta["pooling"])
        self.model.load_state_dict(load_file(str(d / "router.safetensors")))
        self.model.to(self.device).eval()

    @classmethod
    def from_store(cls, store, rel_dir: str) -> Router:
        """Copy what inference needs (not the Ray Train checkpoints) out of a possibly remote store; load it."""
        tmp = Path(tempfile.mkdtemp(prefix="zooter-router-"))
        try:
            for name in ("router.json", "router.safetensors"):
                store.fs.get(store.path(f"{rel_dir}/{name}"), str(tmp / name))
            (tmp / "encoder").mkdir()
            for name in store.ls(f"{rel_dir}/encoder"):
                store.fs.get(store.path(f"{rel_dir}/encoder/{name}"), str(tmp / "encoder" / name))
            return cls(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @torch.inference_mode()
    def probs(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                           max_length=self.max_length).to(self.device)
            out.append(torch.softmax(self.model(enc["input_ids"], enc["attention_mask"]).float(), -1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.experts)))

    def route(self, texts: list[str]) -> list[str]:
        return [self.experts[i] for i in self.probs(texts).argmax(-1)]
