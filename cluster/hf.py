"""The `hf` backend: transformers on CPU or GPU. One instance per Ray actor, loaded once, reused for every shard.

- `HFGenerator`: batched `generate` with left padding, greedy by default, seeded sampling as an option.
- `HFLoglikScorer`: length-normalised log p(answer | prompt) under a judge LM (a proxy reward), optionally minus
  log p(answer) after an empty prompt (`pmi`).
- `HFClassifierScorer`: an `AutoModelForSequenceClassification` reward model; the score is its raw logit.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.utils import logging as hf_logging

from cluster import models
from cluster.batches import Generation, failed_row, length_batches

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A forward pass's fixed cost (reading every weight once) in tokens of compute, for `length_batches`. Measured on a
# 2-core CPU, fp32: a 1-token forward of Qwen2.5-0.5B / SmolLM2-135M / Gemma-3-270M costs as much as 23-76 more
# tokens of a long one (more with 2 threads than 1), so a scorer's batch is split where that saves more padding,
# and a generation's (one such pass per new token) only for a prompt far longer than the rest. On a GPU compute is
# cheap next to a weight read: batches stay full and are only sorted by length.
STEP_TOKENS = {"cpu": 32.0}
GPU_STEP_TOKENS = 256.0


def _step_tokens(device: torch.device) -> float:
    return STEP_TOKENS.get(device.type, GPU_STEP_TOKENS)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(auto_cls, ref: str, dtype: str, threads: int, trust_remote_code: bool, revision: str | None = None,
          expect: str | None = None):
    """Tokenizer (left padding) and model, loaded once per actor. `revision`/`expect` as in `models.resolve`."""
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # an actor (or the gateway): a "Loading weights" bar per load is log noise
    path = models.resolve(ref, revision, expect)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    tok.truncation_side = "left"  # long prompts keep their end (the question and the generation prompt)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = auto_cls.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    return tok, model.to(_device()).eval()


def render_chat(tok, query: str, answer: str | None = None) -> str:
    """The prompt as the model's chat template renders it (with the answer as the assistant turn when given,
    for reward models); a plain Question/Answer layout where the model has no template."""
    if getattr(tok, "chat_template", None):
        msgs = [{"role": "user", "content": query}]
        if answer is None:
            return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return tok.apply_chat_template([*msgs, {"role": "assistant", "content": answer}], tokenize=False)
    return f"Question: {query}\nAnswer:" + ("" if answer is None else f" {answer}")


class _StopStrings(StoppingCriteria):
    """Stop a row once its generated text contains a stop string. (transformers' own `stop_strings` builds
    tables over the whole vocabulary on every call: seconds for Gemma's 262k tokens.)"""

    def __init__(self, tok, stop: list[str], prompt_len: int):
        self.tok, self.stop, self.prompt_len = tok, stop, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw) -> torch.Tensor:
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


class HFGenerator:
    backend = "hf"

    def __init__(self, model: str, dtype: str = "bfloat16", threads: int = 1, trust_remote_code: bool = False,
                 revision: str | None = None, expect: str | None = None):
        self.tok, self.model = _load(AutoModelForCausalLM, model, dtype, threads, trust_remote_code, revision, expect)
        self.device = self.model.device
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        # The first generate in a process is 2-5x slower on CPU: pay it here, not inside the first shard.
        self.generate(["Hello"], max_new_tokens=2)

    def render(self, query: str) -> str:
        return render_chat(self.tok, query)

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int = 48, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop: list[str] | None = None, batch_size: int = 8) -> list[Generation]:
        stop = [s for s in (stop or []) if s]
        # Prompts longer than the context are truncated from the left (documented), never a crash.
        max_prompt = max(8, self.max_context - max_new_tokens)
        bos = self.tok.bos_token
        if bos:  # chat templates usually carry BOS already; plain templates need it (Gemma is lost without it)
            prompts = [p if p.startswith(bos) else bos + p for p in prompts]
        out: list[Generation | None] = [None] * len(prompts)
        ids: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            try:  # a row the tokenizer refuses fails alone
                ids[i] = self.tok(p, add_special_tokens=False, truncation=True, max_length=max_prompt)["input_ids"]
            except Exception as e:  # noqa: BLE001 - recorded as that row's error
                out[i] = failed_row(e)
        rows = sorted(ids)
        for batch in length_batches([len(ids[i]) for i in rows], batch_size,
                                    max_new_tokens * _step_tokens(self.device)):
            idx = [rows[b] for b in batch]
            enc = self.tok.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(self.device)
            kw: dict = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tok.pad_token_id}
            if temperature > 0:
                torch.manual_seed(seed + idx[0])
                kw.update(do_sample=True, temperature=temperature, top_p=top_p)
            else:
                kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if stop:
                prompt_len = enc["input_ids"].shape[1]
                kw["stopping_criteria"] = StoppingCriteriaList([_StopStrings(self.tok, stop, prompt_len)])
            new = self.model.generate(**enc, **kw)[:, enc["input_ids"].shape[1]:]
            for i, row in zip(idx, new.tolist(), strict=True):
                out[i] = self._finish(row, len(ids[i]), max_new_tokens, stop)
        return out

    def _finish(self, row: list[int], prompt_tokens: int, max_new: int, stop: list[str]) -> Generation:
        eos = self.model.generation_config.eos_token_id
        # finished rows are padded: the answer ends at the first EOS or pad token
        eos = set(eos if isinstance(eos, list) else [eos]) | {self.tok.eos_token_id, self.tok.pad_token_id}
        n = len(row)
        for i, t in enumerate(row):
            if t in eos:
                n = i
                break
        text = self.tok.decode(row[:n], skip_special_tokens=True)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        stopped = n < len(row) or cut >= 0 or len(row) < max_new
        if cut >= 0:
            text = text[:cut]
        return Generation(text.strip(), prompt_tokens, n, "stop" if stopped else "length")


class HFLoglikScorer:
    """Mean log-probability per answer token under a judge LM: a proxy reward that needs no reward model.

    Known biases (documented in README): it prefers short, generic and the judge's own phrasing. `normalise="pmi"`
    subtracts the same mean after an empty question (log p(a | q) - log p(a), per answer token): what the judge
    finds likely whatever the question was, its own greedy phrasing first, cancels.
    """

    backend = "hf"

    def __init__(self, model: str, dtype: str = "bfloat16", threads: int = 1, trust_remote_code: bool = False,
                 max_length: int = 512, revision: str | None = None, expect: str | None = None,
                 normalise: str = "mean"):
        self.tok, self.model = _load(AutoModelForCausalLM, model, dtype, threads, trust_remote_code, revision, expect)
        self.device = self.model.device
        self.max_length = max_length
        self.normalise = normalise

    def score(self, queries: list[str], answers: list[str], batch_size: int = 8) -> list[float | None]:
        cond = self.mean_logp(queries, answers, batch_size)
        if self.normalise == "mean":
            return cond
        prior = self.mean_logp([""] * len(answers), answers, batch_size)
        return [None if c is None or p is None else c - p for c, p in zip(cond, prior, strict=True)]

    @torch.inference_mode()
    def mean_logp(self, queries: list[str], answers: list[str], batch_size: int = 8) -> list[float | None]:
        """Mean log p(answer token | chat prompt of the query, earlier answer tokens); None for an empty answer."""
        rows = []
        for q, a in zip(queries, answers, strict=True):
            ans = self.tok(a, add_special_tokens=False)["input_ids"][: self.max_length // 2]
            pre = self.tok(render_chat(self.tok, q), add_special_tokens=False)["input_ids"]
            pre = pre[-(self.max_length - len(ans)):]  # keep the end of a long prompt
            rows.append((pre, ans))
        out: list[float | None] = [None] * len(rows)
        for idx in length_batches([len(p) + len(a) for p, a in rows], batch_size, _step_tokens(self.device)):
            batch = [rows[i] for i in idx]
            width = max(len(p) + len(a) for p, a in batch)
            keep = max(len(a) for _, a in batch) + 1
            # Left padding puts every answer at the end, so the LM head only runs on the last `keep`
            # positions (a full-vocabulary log-softmax over whole prompts dominated the cost).
            ids = torch.full((len(batch), width), self.tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (p, a) in enumerate(batch):
                ids[i, width - len(p) - len(a):] = torch.tensor(p + a)
                mask[i, width - len(p) - len(a):] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                logits_to_keep=keep).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)  # position j predicts token width - keep + j + 1
            tgt = ids[:, width - keep + 1:].to(self.device)
            tok_logp = logp.gather(-1, tgt[..., None])[..., 0]
            for i, (j, (_, a)) in enumerate(zip(idx, batch, strict=True)):
                out[j] = float(tok_logp[i, keep - 1 - len(a):].mean()) if a else None
        return out


class HFClassifierScorer:
    """A sequence-classification reward model: the score is the raw logit of (query, answer)."""

    backend = "hf"

    def __init__(self, model: str, dtype: str = "bfloat16", threads: int = 1, trust_remote_code: bool = False,
                 max_length: int = 512, revision: str | None = None, expect: str | None = None):
        self.tok, self.model = _load(AutoModelForSequenceClassification, model, dtype, threads, trust_remote_code,
                                     revision, expect)
        self.device = self.model.device
        if self.model.config.num_labels != 1:
            raise models.ModelSourceError(
                f"{model}: a reward model must have num_labels=1 (has {self.model.config.num_labels})")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        # Right padding: an encoder with absolute positions (BERT) scored a left-padded row differently from the same
        # row alone; decoder reward models find their last non-pad token either way.
        self.tok.padding_side = "right"
        self.max_length = max_length

    @torch.inference_mode()
    def score(self, queries: list[str], answers: list[str], batch_size: int = 8) -> list[float | None]:
        ids = [self.tok(render_chat(self.tok, q, a), truncation=True, max_length=self.max_length)["input_ids"]
               for q, a in zip(queries, answers, strict=True)]
        out: list[float | None] = [None] * len(ids)
        for idx in length_batches([len(x) for x in ids], batch_size, _step_tokens(self.device)):
            enc = self.tok.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(self.device)
            for i, x in zip(idx, self.model(**enc).logits[:, 0].float().tolist(), strict=True):
                out[i] = float(x)
        return out
