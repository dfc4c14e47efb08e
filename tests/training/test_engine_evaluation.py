"""`train(..., evaluate=...)`: held-out scoring through the training engine (SFT's before/after loss,
DPO's final and held-out rewards), so no rank needs the whole model on its host.

Checked against a direct computation on the dense model (the token-weighted mean for SFT, one batch of
every pair for DPO), across layouts (ZeRO-3 over 2 ranks, TP 2, PP 2: the same scores as one
process), and across a resume (the start-of-run score comes from the checkpoint, not from the
resumed weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kubellm.dpo.objective import DPOObjective
from kubellm.model import Transformer
from kubellm.sft.data import IGNORE, PackedSequence
from kubellm.sft.objective import SFTObjective, packs_to_arrays
from kubellm.training.config import OptimConfig, ParallelConfig, TrainConfig
from kubellm.training.engine import train
from kubellm.training.evaluation import Evaluation
from kubellm.training.spawn import spawn
from tests.parallel.parallel_helpers import VOCAB, tiny_model

SEQ = 32


def _packs(n: int, seed: int) -> list[PackedSequence]:
    """Packs of 1–3 "conversations" with labelled spans of very different lengths, then padding (its own
    doc id, no labels), as `pack_examples` lays them out."""
    rng = np.random.default_rng(seed)
    packs = []
    for _ in range(n):
        ids: list[int] = []
        labels: list[int] = []
        docs: list[int] = []
        pos: list[int] = []
        for doc in range(int(rng.integers(1, 4))):
            length = int(rng.integers(4, 10))
            if len(ids) + length > SEQ:
                break
            answer = int(rng.integers(1, length))  # the last `answer` tokens are the "assistant's"
            ids += rng.integers(3, VOCAB, length).tolist()
            # answers use 3 tokens, so training on some packs lowers the loss on others
            labels += [IGNORE] * (length - answer) + rng.integers(5, 8, answer).tolist()
            docs += [doc] * length
            pos += list(range(length))
        pad = SEQ - len(ids)
        packs.append(PackedSequence(ids + [0] * pad, labels + [IGNORE] * pad, docs + [docs[-1] + 1] * pad,
                                    pos + list(range(pad))))
    return packs


def _train_cfg(steps: int, micro: int = 2, **kw: Any) -> TrainConfig:
    return TrainConfig(max_steps=steps, micro_batch_size=micro, global_batch_size=4, seq_len=SEQ, device="cpu",
                       progress_bar=False, tensorboard=False,
                       optim=OptimConfig(lr=3e-3, warmup_steps=0, weight_decay=0.0), **kw)


def _token_mean(model: torch.nn.Module, packs: list[PackedSequence]) -> float:
    """The held-out loss computed directly: every labelled token of every pack, one pack at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for a in packs_to_arrays(packs):
            b = {k: torch.from_numpy(v)[None] for k, v in a.items()}
            n = int((b["labels"] != IGNORE).sum())
            loss = model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"], labels=b["labels"],
                         ignore_index=IGNORE)
            total, count = total + float(loss) * n, count + n
    return total / count


def _start_weights(cfg: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(11)
    return Transformer(cfg).state_dict()


def test_sft_scores_are_the_token_mean_of_the_start_and_final_weights(tmp_path: Path) -> None:
    cfg = tiny_model()
    start = _start_weights(cfg)
    held = _packs(7, seed=1)  # micro-batches of 2: the last one holds a single pack
    res = train(cfg, _train_cfg(6, micro=2), ParallelConfig(), SFTObjective(_packs(12, seed=0)), str(tmp_path / "r"),
                init_state_dict=start, resume=False,
                evaluate={"heldout": Evaluation(packs_to_arrays(held), at_start=True)})
    model = Transformer(cfg)
    model.load_state_dict(start)
    before = _token_mean(model, held)
    assert res.scores["start"]["heldout"]["loss"] == pytest.approx(before, rel=1e-6)
    assert res.final_state_dict is not None
    model.load_state_dict(res.final_state_dict)
    after = _token_mean(model, held)
    assert res.scores["end"]["heldout"]["loss"] == pytest.approx(after, rel=1e-6)
    assert after < before - 0.1, (before, after)  # it trained, and the score saw it


def test_dpo_scores_equal_one_batch_of_every_pair(tmp_path: Path) -> None:
    cfg = tiny_model()
    rng = np.random.default_rng(3)
    pairs = []
    for _ in range(11):  # micro-batches of 4: the last one holds 3 pairs
        ids = rng.integers(3, VOCAB, (2, SEQ))
        labels = rng.integers(3, VOCAB, (2, SEQ))
        labels[:, : int(rng.integers(4, 20))] = IGNORE  # the prompt
        pairs.append({"input_ids": ids.astype(np.int64), "labels": labels.astype(np.int64)})
    torch.manual_seed(2)
    reference = Transformer(cfg).requires_grad_(False)
    objective = DPOObjective(pairs, beta=0.5, reference=reference)
    res = train(cfg, _train_cfg(3, micro=4), ParallelConfig(), objective, str(tmp_path / "r"),
                init_state_dict=reference.state_dict(), resume=False, evaluate={"all": Evaluation(pairs)})
    assert res.final_state_dict is not None
    policy = Transformer(cfg)
    policy.load_state_dict(res.final_state_dict)
    whole = {k: torch.from_numpy(np.stack([p[k] for p in pairs])) for k in ("input_ids", "labels")}
    with torch.no_grad():
        loss, want = objective.loss(policy, whole)
    want["loss"] = loss
    got = res.scores["end"]["all"]
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(float(want[k]), rel=1e-5, abs=1e-6), k
    assert got["reward_margin"] != 0.0  # the policy moved away from the reference


def test_a_resumed_run_reports_the_start_score_of_its_first_attempt(tmp_path: Path) -> None:
    cfg = tiny_model()
    start = _start_weights(cfg)
    held = packs_to_arrays(_packs(5, seed=1))
    objective = SFTObjective(_packs(12, seed=0))

    def run(run_dir: Path, steps: int) -> Any:
        tc = _train_cfg(steps)  # a constant lr: 2 + 2 steps follow the 4-step run's schedule
        tc = tc.model_copy(update={"optim": tc.optim.model_copy(update={"min_lr_ratio": 1.0})})
        return train(cfg, tc, ParallelConfig(), objective, str(run_dir), init_state_dict=start,
                     resume=True, evaluate={"heldout": Evaluation(held, at_start=True)})

    whole = run(tmp_path / "whole", 4)
    first = run(tmp_path / "split", 2)
    resumed = run(tmp_path / "split", 4)
    assert resumed.start_step == 2
    # from the checkpoint: scoring the resumed (trained) weights would give a lower loss
    assert resumed.scores["start"] == first.scores["start"] == whole.scores["start"]
    assert first.scores["end"]["heldout"]["loss"] < first.scores["start"]["heldout"]["loss"]
    assert resumed.scores["end"]["heldout"]["loss"] == pytest.approx(whole.scores["end"]["heldout"]["loss"],
                                                                      rel=1e-6)


def _layout_rank(run_dir: str, layout: dict[str, int], zero_stage: int) -> dict[str, Any]:
    cfg = tiny_model()
    held = packs_to_arrays(_packs(9, seed=1))  # 5 micro-batches of 2: uneven over 2 replicas, the last short
    res = train(cfg, _train_cfg(3, zero_stage=zero_stage), ParallelConfig(**layout), SFTObjective(_packs(12, seed=0)),
                run_dir, init_state_dict=_start_weights(cfg), resume=False,
                evaluate={"heldout": Evaluation(held, at_start=True)})
    return {"scores": res.scores, "losses": res.losses}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return spawn(_layout_rank, 1, str(tmp_path_factory.mktemp("one")), {"dp": 1}, 1)[0]


@pytest.mark.integration
@pytest.mark.parametrize("layout,zero_stage,world", [
    pytest.param({"dp": 2}, 3, 2, id="zero3-dp2"),
    pytest.param({"tp": 2}, 1, 2, id="tp2"),
    pytest.param({"pp": 2}, 1, 2, id="pp2"),
    pytest.param({"tp": 2, "pp": 2}, 1, 4, id="tp2xpp2"),
])
def test_layouts_score_what_one_process_scores(one_process: dict[str, Any], tmp_path: Path,
                                               layout: dict[str, int], zero_stage: int, world: int) -> None:
    ranks = spawn(_layout_rank, world, str(tmp_path), layout, zero_stage)
    want = one_process["scores"]
    assert want["end"]["heldout"]["loss"] < want["start"]["heldout"]["loss"]
    for r in ranks:  # every rank holds the same all-reduced scores
        np.testing.assert_allclose(r["losses"], one_process["losses"], rtol=1e-5)
        assert r["scores"]["start"]["heldout"]["loss"] == pytest.approx(want["start"]["heldout"]["loss"], rel=1e-5)
        assert r["scores"]["end"]["heldout"]["loss"] == pytest.approx(want["end"]["heldout"]["loss"], rel=1e-5)


def _failing_rank(run_dir: str) -> str:
    import torch.distributed as dist

    class FailsWhenScoring(SFTObjective):
        def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> Any:
            if not torch.is_grad_enabled() and dist.get_rank() == 1:
                raise MemoryError("scoring ran out of memory")
            return super().loss(model, batch)

    cfg = tiny_model()
    try:
        train(cfg, _train_cfg(2), ParallelConfig(dp=2), FailsWhenScoring(_packs(12, seed=0)), run_dir,
              init_state_dict=_start_weights(cfg), resume=False,
              evaluate={"heldout": Evaluation(packs_to_arrays(_packs(5, seed=1)), at_start=True)})
    except (MemoryError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.mark.integration
def test_a_rank_that_fails_to_score_fails_every_rank_at_once(tmp_path: Path) -> None:
    """ZeRO 0-2 forwards run no collective: the peer of a rank that failed would otherwise wait in the
    scores' all-reduce until the process-group timeout."""
    r0, r1 = spawn(_failing_rank, 2, str(tmp_path), timeout=120)
    assert r1 == "MemoryError: scoring ran out of memory"
    assert r0 == "RuntimeError: held-out scoring failed on 1 rank(s): rank 1: MemoryError: scoring ran out of memory"
