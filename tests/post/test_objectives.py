"""SFT and DPO objectives through the real engine (1 process, DeepSpeed ZeRO-0 on CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from kubellm.dpo.data import read_preferences_jsonl, to_arrays
from kubellm.dpo.objective import DPOObjective, precompute_reference
from kubellm.model import Transformer
from kubellm.model.config import ModelConfig
from kubellm.sft.data import SkipReport, pack_examples, render_conversation
from kubellm.sft.objective import ExampleLoader, SFTObjective, assistant_token_loss
from kubellm.training.config import OptimConfig, ParallelConfig, TrainConfig
from kubellm.training.engine import train


def _cfg(vocab: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


def _train_cfg(steps: int, lr: float = 3e-3) -> TrainConfig:
    return TrainConfig(max_steps=steps, micro_batch_size=4, global_batch_size=4, seq_len=64, device="cpu",
                       progress_bar=False, tensorboard=False,
                       optim=OptimConfig(lr=lr, warmup_steps=0, weight_decay=0.0))


def _pairs(tmp_path: Path) -> Path:
    f = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}", "rejected": f"The answer is {a + b + 1}."}
            for a in range(8) for b in range(4)]
    rows.append({"prompt": "same?", "chosen": "yes", "rejected": "yes"})
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


def test_example_loader_splits_ranks_without_overlap_and_resumes() -> None:
    import numpy as np

    ex = [{"x": np.asarray([i])} for i in range(10)]
    seen = [sorted(int(v) for _ in range(2) for v in ExampleLoader(ex, r, 2, 2, 0).__next__()["x"].flatten())
            for r in range(2)]
    assert not set(seen[0]) & set(seen[1])
    a = ExampleLoader(ex, 0, 1, 3, 7)
    for _ in range(4):
        next(a)
    b = ExampleLoader(ex, 0, 1, 3, 7)
    b.load_state_dict(a.state_dict())
    assert torch.equal(next(a)["x"], next(b)["x"])


def test_cached_and_live_reference_give_the_same_loss(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    rep = SkipReport()
    exs = read_preferences_jsonl([_pairs(tmp_path)], tok, 64, rep)
    assert rep.counts == {"identical_pair": 1}
    torch.manual_seed(0)
    policy, ref = Transformer(_cfg(len(tok))), Transformer(_cfg(len(tok)))
    live_arrays = to_arrays(exs, 64, tok.pad_token_id)
    cached_arrays = to_arrays(exs, 64, tok.pad_token_id)
    precompute_reference(ref, cached_arrays)
    live = DPOObjective(live_arrays, beta=0.1, reference=ref)
    cached = DPOObjective(cached_arrays, beta=0.1)
    bl, bc = next(live.build_loader(0, 1, 8, 0)), next(cached.build_loader(0, 1, 8, 0))
    l1, m1 = live.loss(policy, bl)
    l2, m2 = cached.loss(policy, bc)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-5)
    # policy == reference -> log 2 and zero margin
    same = DPOObjective(to_arrays(exs, 64, tok.pad_token_id), beta=0.1, reference=policy)
    l3, m3 = same.loss(policy, next(same.build_loader(0, 1, 8, 0)))
    assert l3.item() == pytest.approx(math.log(2), rel=1e-5) and m3["reward_margin"].item() == 0.0


def test_dpo_steps_raise_reward_accuracy(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    exs = read_preferences_jsonl([_pairs(tmp_path)], tok, 64, SkipReport())
    cfg = _cfg(len(tok))
    torch.manual_seed(1)
    start = Transformer(cfg).state_dict()
    ref = Transformer(cfg)
    ref.load_state_dict(start)
    arrays = to_arrays(exs, 64, tok.pad_token_id)
    precompute_reference(ref, arrays)
    res = train(cfg, _train_cfg(12, lr=5e-3), ParallelConfig(), DPOObjective(arrays, beta=0.5),
                str(tmp_path / "run"), init_state_dict=start, resume=False)
    assert res.losses[0] == pytest.approx(math.log(2), rel=1e-3)
    assert res.losses[-1] < res.losses[0]
    # reward accuracy of the trained policy over all pairs
    policy = Transformer(cfg)
    policy.load_state_dict(res.final_state_dict)
    obj = DPOObjective(arrays, beta=0.5)
    _, m = obj.loss(policy, next(obj.build_loader(0, 1, len(arrays), 0)))
    assert m["reward_accuracy"].item() > 0.5
    assert any(not torch.equal(start[k], res.final_state_dict[k]) for k in start)


def test_sft_lowers_heldout_assistant_loss(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    convs = [[{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}"}]
             for a in range(12) for b in range(6)]
    train_ex = [render_conversation(tok, c) for c in convs[:60]]
    held = pack_examples([render_conversation(tok, c) for c in convs[60:]], 64, tok.pad_token_id)
    cfg = _cfg(len(tok))
    torch.manual_seed(2)
    start = Transformer(cfg)
    before = assistant_token_loss(start, held)
    res = train(cfg, _train_cfg(15), ParallelConfig(), SFTObjective(pack_examples(train_ex, 64, tok.pad_token_id)),
                str(tmp_path / "run"), init_state_dict=start.state_dict(), resume=False)
    after_model = Transformer(cfg)
    after_model.load_state_dict(res.final_state_dict)
    after = assistant_token_loss(after_model, held)
    assert after < before - 0.5, (before, after)
