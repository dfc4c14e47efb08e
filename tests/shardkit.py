"""Small learnable token shards for engine tests (arithmetic-progression documents: the loss falls fast).

Importable from any test module (pytest puts tests/ on sys.path for the root conftest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_shards(root: Path, vocab: int = 256, docs: int = 200, seed: int = 0) -> list[str]:
    """Two shards under root/train/, each document `[bos=1] + progression + [eos=2]`."""
    from kubellm.tokenizer.shards import TokenShardWriter

    rng = np.random.default_rng(seed)
    paths = []
    for s in range(2):
        p = root / f"train/shard-{s:05d}.tok"
        with TokenShardWriter(p, vocab) as w:
            for _ in range(docs // 2):
                n = int(rng.integers(10, 60))
                start = int(rng.integers(3, vocab))
                w.add_document([1, *((start + np.arange(n) * 3) % (vocab - 3) + 3), 2])
        paths.append(str(p))
    return paths
