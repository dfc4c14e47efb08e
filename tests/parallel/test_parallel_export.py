"""The stages' export: every rank gathers the trained weights a shard at a time (`TrainResult.gather`) and
rank 0 writes each shard as it arrives, so no rank holds the whole model. The export must hold exactly
the weights the whole-model consolidation gives, in every layout (ZeRO-3 partitions, TP shards, pipeline
stages, a tied head), and a failure writing a shard must fail every rank, not leave them in a gather."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubellm.training.spawn import spawn
from tests.parallel.parallel_helpers import make_shards, tiny_model

SHARD_BYTES = 40_000  # the tiny model's fp32 weights (~190 kB) in several shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return make_shards(tmp_path_factory.mktemp("eshards"), docs=60)


def export_worker(shards: list[str], run_dir: str, layout: dict[str, int], zero_stage: int, tied: bool,
                  fail: bool) -> dict[str, Any]:
    import torch.distributed as dist

    from kubellm.model.hf import export_hf, load_hf
    from kubellm.pretrain.objective import PretrainObjective
    from kubellm.training.collective import raise_if_any_failed
    from kubellm.training.config import OptimConfig, ParallelConfig, TrainConfig
    from kubellm.training.engine import train

    cfg = tiny_model(tie_embeddings=tied)
    tc = TrainConfig(max_steps=2, micro_batch_size=2, global_batch_size=8, seq_len=32, zero_stage=zero_stage,
                     progress_bar=False, tensorboard=False, optim=OptimConfig(lr=3e-3, warmup_steps=1))
    result = train(cfg, tc, ParallelConfig(**layout), PretrainObjective(shards, seq_len=32, vocab_size=256), run_dir,
                   resume=False, consolidate_final=False)
    assert result.final_state_dict is None and result.gather is not None
    rank = dist.get_rank()
    calls: list[int] = []
    exact: list[bool] = []  # rank 0: each gather returned the names asked for and nothing more

    def gather(names: Any) -> Any:
        calls.append(len(names))
        chunk = result.gather(names)
        if chunk is not None:
            exact.append(set(chunk) == set(names))
        return chunk

    def sync(error: BaseException | None) -> None:
        raise_if_any_failed(error, "HF export", {}, RuntimeError)

    out = Path(run_dir) / "hf"
    if fail and rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("a file where the export directory should go")  # rank 0 fails writing its first shard
    try:
        written = export_hf(gather, cfg, out if rank == 0 else None, max_shard_bytes=SHARD_BYTES, sync=sync)
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"error": f"{type(e).__name__}: {e}", "calls": len(calls)}
    res: dict[str, Any] = {"written": str(written) if written else None, "calls": len(calls)}
    want = result.gather(None)  # the whole-model consolidation (what consolidate_final=True returns)
    if rank == 0:
        assert want is not None
        back, _ = load_hf(out)
        got = back.state_dict()
        res["names"] = sorted(want) == sorted(got)
        res["max_diff"] = max(float((got[k] - want[k]).abs().max()) for k in want)
        res["files"] = sorted(p.name for p in out.glob("model*"))
        res["exact"] = bool(exact) and all(exact)
    return res


@pytest.mark.integration
@pytest.mark.parametrize("layout,world,zero,tied", [
    pytest.param({"dp": 2}, 2, 3, False, id="zero3-dp2"),
    pytest.param({"tp": 2}, 2, 1, True, id="tp2-tied"),
    pytest.param({"pp": 2}, 2, 1, True, id="pp2-tied"),
    pytest.param({"pp": 2}, 2, 0, False, id="pp2"),
])
def test_a_shard_at_a_time_export_holds_the_consolidated_weights(shards: list[str], tmp_path: Path,
                                                                 layout: dict[str, int], world: int, zero: int,
                                                                 tied: bool) -> None:
    ranks = spawn(export_worker, world, shards, str(tmp_path), layout, zero, tied, False)
    first = ranks[0]
    assert first["names"] and first["max_diff"] == 0.0 and first["exact"], first
    n = len(first["files"]) - 1  # the shards and their index
    assert n > 2 and "model.safetensors.index.json" in first["files"], first
    assert all(r["calls"] == n for r in ranks)  # every rank took part in every shard's gather
    assert first["written"] and all(r["written"] is None for r in ranks[1:])


@pytest.mark.integration
def test_a_failed_shard_write_fails_every_rank(shards: list[str], tmp_path: Path) -> None:
    ranks = spawn(export_worker, 2, shards, str(tmp_path), {"dp": 2}, 3, False, True)
    assert all("error" in r for r in ranks), ranks
    assert "FileExistsError" in ranks[0]["error"] or "NotADirectoryError" in ranks[0]["error"], ranks[0]
    assert "HF export failed on 1 rank(s): rank 0" in ranks[1]["error"], ranks[1]
    assert all(r["calls"] == 1 for r in ranks)  # stopped after the first shard, together
