"""Held-out scoring through the training engine: the objective's loss, no update.

    result = train(..., evaluate={"heldout": Evaluation(examples, at_start=True)})
    result.scores["start"]["heldout"]["loss"], result.scores["end"]["heldout"]["loss"]

`train` calls `evaluate_examples` on every rank, so under ZeRO-3, TP or PP no rank needs the whole model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from kubellm.model.parallel import collective_device
from kubellm.training.collective import raise_if_any_failed
from kubellm.training.data import collate, to_device
from kubellm.training.pipeline import PipelineBatches
from kubellm.training.topology import ParallelModel

if TYPE_CHECKING:
    from kubellm.training.engine import Objective


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Examples (the objective's fixed-shape arrays, as its loader reads them) that `train` scores with the
    objective's loss, without an update: after the last step, and before the first when `at_start`.

    Each data-parallel replica scores every dp-th micro-batch of them on the training device, in the
    training precision, through the engine (ZeRO-3 gathers its parameters, TP ranks compute their
    shards, a pipeline runs DeepSpeed's inference schedule). The loss and the objective's metrics are
    means weighted by the objective's `target_tokens` (SFT: over every assistant token), else by
    example (DPO: over pairs)."""

    examples: Sequence[dict[str, np.ndarray]]
    at_start: bool = False


def evaluate_examples(engine: Any, objective: Objective, examples: Sequence[dict[str, np.ndarray]], micro: int,
                      built: ParallelModel | None, device: str, autocast: contextlib.AbstractContextManager[Any]
                      ) -> dict[str, float]:
    """Weighted means of the objective's loss and metrics over `examples` (see `Evaluation`); collective:
    every rank of the job calls it. Every replica runs as many forward passes (a replica short of
    micro-batches repeats one with weight 0), as ZeRO-3's parameter gathers and TP's collectives need."""
    from kubellm.sft.data import IGNORE

    pipeline = built is not None and built.pipeline
    dp_rank, dp_size = (built.dp_rank, built.dp_size) if built is not None else (dist.get_rank(), dist.get_world_size())

    # each micro-batch is stacked once, when it is reached: the objective's weight needs every one (the
    # same weights on every rank), this replica keeps only its own
    n = -(-len(examples) // micro)
    weigh = getattr(objective, "target_tokens", None)

    def weight(rows: Sequence[dict[str, np.ndarray]], b: dict[str, Tensor] | None = None) -> float:
        if weigh is None:
            return float(len(rows))
        return float(weigh(b if b is not None else collate(rows)))

    weights: list[float] = []
    mine: list[tuple[dict[str, Tensor], float]] = []
    for i in range(n):
        rows = examples[i * micro : (i + 1) * micro]
        if i % dp_size == dp_rank:
            b = collate(rows)
            mine.append((b, weight(rows, b)))
            weights.append(mine[-1][1])
        else:
            weights.append(weight(rows))
    total = sum(weights)
    if total == 0:
        return {}
    per = -(-n // dp_size)
    mine += [(mine[0][0] if mine else collate(examples[:micro]), 0.0)] * (per - len(mine))
    if pipeline:
        # the pipeline sends activations of one shape: a short last micro-batch gets rows whose labels
        # are all ignored (the causal-LM loss is a mean over labelled tokens, which they leave as it is)
        def full(b: dict[str, Tensor]) -> dict[str, Tensor]:
            short = micro - b["input_ids"].shape[0]
            if not short:
                return b
            pad = {k: v[:1].expand(short, *v.shape[1:]) for k, v in b.items()}
            pad["labels"] = torch.full_like(pad["labels"], IGNORE)
            return {k: torch.cat([v, pad[k]]) for k, v in b.items()}

        feed = PipelineBatches(iter(()), objective.tokens)
        feed.feed([full(b) for b, _ in mine], [w for _, w in mine])  # each loss times its weight
        with autocast:
            out = engine.eval_batch(data_iter=feed, num_micro_batches=per)  # mean over micro-batches and dp
        return {"loss": float(out) * per * dp_size / total}
    sums: dict[str, float] = {}
    error: BaseException | None = None
    engine.eval()
    try:
        with torch.no_grad():
            for b, w in mine:
                with autocast:
                    loss, metrics = objective.loss(engine, to_device(b, device))
                for k, v in {"loss": loss, **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + (float(v) * w if w else 0.0)
    except Exception as e:  # noqa: BLE001 - raised on every rank below, after the peers have heard of it
        error = e
    finally:
        engine.train()
    # a rank that failed (out of memory on its share) fails every rank here, not after a timeout in the
    # all-reduce (ZeRO 0-2 forwards run no collective of their own; ZeRO-3/TP ones would still wait)
    raise_if_any_failed(error, "held-out scoring", {}, RuntimeError)
    keys = sorted(sums)
    counts = built is None or built.tp_rank == 0  # a replica's TP ranks compute the same values
    reduced = torch.tensor([sums[k] if counts else 0.0 for k in keys], dtype=torch.float64,
                           device=collective_device())
    if dist.get_world_size() > 1:
        dist.all_reduce(reduced)
    return {k: float(reduced[i]) / total for i, k in enumerate(keys)}
