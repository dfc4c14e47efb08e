"""Held-out perplexity of an HF causal LM on packed token shards (`kubellm.tokenizer.shards`).

    ppl = shard_perplexity(model, ["/tmp/val/validation/00000.tok"], seq_len=256, batch_size=8)

Token-weighted: exp(total NLL / number of predicted tokens) over every document, so a long document
counts for its length. Each document (`[bos] + ids + [eos]`) is cut into windows of `seq_len`
tokens; the first token of a document is never predicted, and window k > 0 starts one token
before its first target so every other token is predicted exactly once, inside its own document.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kubellm.core.errors import InputDataError
from kubellm.tokenizer.shards import TokenShardReader


def windows(paths: Sequence[Path], vocab_size: int, seq_len: int,
            max_tokens: int | None) -> Iterator[np.ndarray]:
    """Token windows (each ≥ 2 tokens) in shard/document order, until `max_tokens` targets."""
    budget = max_tokens if max_tokens is not None else math.inf
    for path in paths:
        reader = TokenShardReader(path, expected_vocab_size=vocab_size)
        for d in range(reader.doc_count):
            doc = reader.document(d)
            start = 0
            while start + 1 < len(doc) and budget > 0:
                win = doc[start : start + seq_len]
                if len(win) - 1 > budget:
                    win = win[: int(budget) + 1]
                budget -= len(win) - 1
                yield win.astype(np.int64)
                start += len(win) - 1
            if budget <= 0:
                return


def shard_perplexity(model: Any, paths: Sequence[Path], *, seq_len: int = 256, batch_size: int = 8,
                     max_tokens: int | None = None) -> dict[str, float]:
    """{"perplexity", "nll" (mean per token, nats), "tokens" (predicted)} of `model` on the shards."""
    import torch

    if not paths:
        raise InputDataError("held-out perplexity: no validation shards (expected validation/*.tok)")
    vocab = int(model.config.vocab_size)
    device = next(model.parameters()).device
    total_nll, total_tok = 0.0, 0
    batch: list[np.ndarray] = []

    def flush() -> None:
        nonlocal total_nll, total_tok
        width = max(len(w) for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, w in enumerate(batch):
            ids[i, : len(w)] = torch.from_numpy(w)
            mask[i, : len(w)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V), the model's dtype
            valid = mask[:, 1:].bool()
            for i in range(len(batch)):  # one row in fp32 at a time: B×T×V fp32 copies were GBs at a 128k vocab
                n = int(valid[i].sum())  # position t predicts token t+1; padding only at the right
                nll = torch.nn.functional.cross_entropy(logits[i, :n].float(), ids[i, 1 : n + 1], reduction="sum")
                total_nll += float(nll.double())
                total_tok += n
        batch.clear()

    was_training = model.training
    model.eval()
    try:
        for w in windows([Path(p) for p in paths], vocab, seq_len, max_tokens):
            batch.append(w)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        model.train(was_training)
    if total_tok == 0:
        raise InputDataError(f"held-out perplexity: the shards {[str(p) for p in paths]} hold no predictable tokens")
    mean = total_nll / total_tok
    ppl = math.inf if mean > 700 else math.exp(mean)  # math.exp raises past ~709.78; nan stays nan
    return {"perplexity": ppl, "nll": mean, "tokens": float(total_tok)}
