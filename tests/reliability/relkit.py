"""Helpers shared by the reliability tests: tiny token shards, a faulty objective, engine runs.

Imported by the test modules next to it (pytest puts this folder on sys.path); the functions that
run inside `kubellm.training.spawn.spawn` children are module-level so they pickle by reference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 256
SEQ = 32


def make_shards(root: Path, docs: int = 200, seed: int = 0) -> list[str]:
    from shardkit import make_shards as shards

    return shards(root, VOCAB, docs, seed)


def publish_tokens(shard_root: Path, output: str) -> str:
    """Publish shard_root (train/*.tok) as a minimal `token_shards` artifact; returns its prefix."""
    from kubellm.core.manifest import content_prefix, publish_dir, stable_hash

    prefix = content_prefix(output, "tokenizer", stable_hash({"reliability": str(shard_root)}), {})
    publish_dir(shard_root, prefix, kind="token_shards", metadata={"vocab_size": VOCAB, "bos_id": 1, "eos_id": 2,
                                                                  "pad_id": 0})
    return prefix


def model_config() -> Any:
    from kubellm.model.config import get_preset

    return get_preset("debug").with_(vocab_size=VOCAB, max_seq_len=64)


def train_config(**kw: Any) -> Any:
    from kubellm.training.config import OptimConfig, TrainConfig

    base: dict[str, Any] = dict(max_steps=8, micro_batch_size=2, global_batch_size=8, seq_len=SEQ,
                                progress_bar=False, tensorboard=False, optim=OptimConfig(lr=3e-3, warmup_steps=2),
                                device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def inf_grad_fn() -> Any:
    import torch

    class InfGrad(torch.autograd.Function):
        """Identity forward; backward multiplies the incoming gradient by +inf."""

        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            return x.view_as(x)

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            return g * float("inf")

    return InfGrad


class _LazyInfGrad:
    def apply(self, x: Any) -> Any:
        return inf_grad_fn().apply(x)


_InfGrad = _LazyInfGrad()


class FaultyObjective:
    """PretrainObjective whose loss is replaced at given (step, rank) pairs — NaN, +Inf, ×factor
    (a spike), or "grad_inf" (finite loss, infinite gradients) — and which records a digest of the full parameters at the start of every step (ZeRO 0/1 keep
    the full fp32 module parameters on every rank)."""

    def __init__(self, shards: list[str], faults: dict[tuple[int, int], Any], accum: int) -> None:
        from kubellm.pretrain.objective import PretrainObjective

        self.inner = PretrainObjective(shards, seq_len=SEQ, vocab_size=VOCAB, prefetch=1)
        self.faults, self.accum, self.calls, self.rank = faults, accum, 0, 0
        self.params_at_step: dict[int, Any] = {}

    def build_loader(self, dp_rank: int, dp_size: int, micro_batch_size: int, seed: int) -> Any:
        self.rank = dp_rank
        return self.inner.build_loader(dp_rank, dp_size, micro_batch_size, seed)

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        import torch

        step = self.calls // self.accum + 1  # 1-based optimizer step this micro-batch belongs to
        if self.calls % self.accum == 0:
            # a sha256 of the exact bits (equal digest <=> bit-identical parameters): small enough to
            # pass back through spawn()'s result pipe, which full snapshots would block
            flat = torch.cat([p.detach().flatten() for p in model.module.parameters()])
            self.params_at_step[step] = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
        self.calls += 1
        loss, metrics = self.inner.loss(model, batch)
        fault = self.faults.get((step, self.rank))
        if fault == "grad_inf":  # finite loss, infinite gradients: only the grad-norm check sees it
            loss = _InfGrad.apply(loss)
        elif fault is not None:
            if np.isnan(fault) or np.isinf(fault):
                loss = loss * 0 + fault  # keeps the graph: backward runs as for a real NaN/Inf loss
            else:
                loss = loss * fault
        return loss, metrics

    def tokens(self, batch: dict[str, Any]) -> int:
        return self.inner.tokens(batch)


def run_faulty(shards: list[str], run_dir: str, faults: dict[tuple[int, int], Any],
               train_kw: dict[str, Any], world: int) -> dict[str, Any]:
    """spawn() target: train with injected loss faults; returns losses, metrics rows and snapshots."""
    from kubellm.training.config import ParallelConfig
    from kubellm.training.engine import train

    tc = train_config(**train_kw)
    accum = tc.global_batch_size // (tc.micro_batch_size * world)
    obj = FaultyObjective(shards, faults, accum)
    try:
        result = train(model_config(), tc, ParallelConfig(dp=world), obj, run_dir, resume=False)
    except FloatingPointError as e:
        return {"error": str(e), "params": obj.params_at_step}
    rows = []
    if result.metrics_path is not None:
        rows = [json.loads(x) for x in Path(result.metrics_path).read_text().splitlines() if x.strip()]
    return {"losses": result.losses, "rows": rows, "summary": result.summary, "params": obj.params_at_step}


def read_metrics(path: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl -> {step: row} (a resumed run drops the rows past its checkpoint and logs each step once)."""
    out: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[int(row["step"])] = row
    return out


def run_with_commit_crash(shards: list[str], run_dir: str, crash_at_step: int | None,
                          train_kw: dict[str, Any]) -> dict[str, Any]:
    """spawn() target (1 process): train with resume; if `crash_at_step`, the process dies (exit 137)
    after that checkpoint's files are uploaded and before its manifest is committed."""
    import os

    import kubellm.training.checkpoint as ckpt_mod
    from kubellm.training.config import ParallelConfig
    from kubellm.training.engine import train

    if crash_at_step is not None:
        real_commit = ckpt_mod.commit_manifest

        def crash_before_commit(manifest: Any) -> Any:
            if int(manifest.metadata.get("step", -1)) == crash_at_step:
                os._exit(137)  # files are uploaded; the manifest never lands
            return real_commit(manifest)

        ckpt_mod.commit_manifest = crash_before_commit  # type: ignore[assignment]
    from kubellm.pretrain.objective import PretrainObjective

    obj = PretrainObjective(shards, seq_len=SEQ, vocab_size=VOCAB, prefetch=1)
    result = train(model_config(), train_config(**train_kw), ParallelConfig(dp=1), obj, run_dir, resume=True)
    return {"losses": result.losses, "start_step": result.start_step}


def run_resume_only(shards: list[str], run_dir: str, train_kw: dict[str, Any], dp: int = 1) -> dict[str, Any]:
    """spawn() target (`dp` processes): train with resume=True; returns losses or the error text."""
    from kubellm.pretrain.objective import PretrainObjective
    from kubellm.training.config import ParallelConfig
    from kubellm.training.engine import train

    obj = PretrainObjective(shards, seq_len=SEQ, vocab_size=VOCAB, prefetch=1)
    try:
        result = train(model_config(), train_config(**train_kw), ParallelConfig(dp=dp), obj, run_dir, resume=True)
    except Exception as e:  # noqa: BLE001 - the test inspects the message
        return {"error": f"{type(e).__name__}: {e}"}
    return {"losses": result.losses, "start_step": result.start_step}
