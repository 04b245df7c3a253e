"""What every model backend shares, with no model library imported: one answer (`Generation`) and how rows are
grouped into batches (`length_batches`). The backends (hf, vllm, openai, synthetic) and the router import this;
cluster/backends.py, which builds them, imports them only when an actor loads one, so imports run one way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from schemas.artifacts import ROW_FAILED


@dataclass
class Generation:
    """One expert answer, whatever the backend. Defined here, not in cluster/hf.py, so that the endpoint and
    synthetic backends (and `zooter validate`, which checks endpoints) never import torch."""

    response: str
    prompt_tokens: int
    new_tokens: int
    finish_reason: str
    error: str | None = None  # this row failed alone (tokenizer, endpoint, context): why, one line; response ""


FAILED = ROW_FAILED  # a failed row's finish_reason in a generation cell, and its flag in a score cell


def failed_row(error: BaseException | str) -> Generation:
    """The answer of a row that failed alone: no text, no tokens, the error kept (the cell records it)."""
    why = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return Generation("", 0, 0, FAILED, " ".join(why.split())[:500])


def length_batches(lengths: Sequence[int], max_rows: int, per_batch: float = 0.0) -> list[list[int]]:
    """Row indices grouped into batches of at most `max_rows` so that padding costs little: rows sorted by length
    (stable), cut where the padded tokens (rows x longest row) plus `per_batch` for each batch (its fixed cost,
    counted in tokens: a forward pass's weight reads, a generation's decode steps) sum to the least. Exact (dynamic
    programming over the sorted rows), O(rows x max_rows). One long prompt no longer pads seven short ones."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best, cut = [0.0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):  # best[j]: the cheapest batching of the j shortest rows
        for i in range(max(0, j - max_rows), j):  # last batch: sorted rows i..j-1, padded to row j-1's length
            cost = best[i] + (j - i) * lengths[order[j - 1]] + per_batch
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches, j = [], len(order)
    while j:
        batches.append(order[cut[j]:j])
        j = cut[j]
    return batches[::-1]
