"""Shared pieces of the 3D-parallel tests: token shards and a training run in a spawned rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

STEPS = 10
SEQ = 32
VOCAB = 256


def make_shards(root: Path, docs: int = 200, seed: int = 0) -> list[str]:
    from shardkit import make_shards as shards

    return shards(root, VOCAB, docs, seed)


def tiny_model(**overrides: Any) -> Any:
    """debug-like: 4 layers (so pp=2 has 2 blocks a stage), 4 heads / 2 KV heads (tp=2 splits both)."""
    from kubellm.model.config import get_preset

    return get_preset("debug").with_(**{"vocab_size": VOCAB, "max_seq_len": 64, "dim": 32, "n_layers": 4,
                                        "ffn_dim": 64, **overrides})


def run_training(shards: list[str], run_dir: str, layout: dict[str, int], zero_stage: int = 1, micro: int = 2,
                 global_batch: int = 8, steps: int = STEPS, model: dict[str, Any] | None = None,
                 train: dict[str, Any] | None = None, resume: bool = False,
                 return_weights: bool = False) -> dict[str, Any]:
    from kubellm.pretrain.objective import PretrainObjective
    from kubellm.training.config import OptimConfig, ParallelConfig, TrainConfig
    from kubellm.training.engine import train as train_fn

    cfg = tiny_model(**(model or {}))
    tc = TrainConfig(max_steps=steps, micro_batch_size=micro, global_batch_size=global_batch, seq_len=SEQ,
                     zero_stage=zero_stage, progress_bar=False, tensorboard=False,
                     optim=OptimConfig(lr=3e-3, warmup_steps=2), **(train or {}))
    obj = PretrainObjective(shards, seq_len=SEQ, vocab_size=VOCAB)
    result = train_fn(cfg, tc, ParallelConfig(**layout), obj, run_dir, resume=resume)
    out: dict[str, Any] = {"losses": result.losses, "start_step": result.start_step}
    if return_weights and result.final_state_dict is not None:
        # through a file: the spawn harness joins its workers before reading their results, so a
        # result larger than a pipe buffer (64 KiB) would block the worker forever
        path = Path(run_dir) / "final_weights.npz"
        np.savez(path, **{k: v.float().numpy() for k, v in result.final_state_dict.items()})
        out["weights"] = str(path)
    return out


def load_weights(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
