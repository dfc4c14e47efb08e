"""SFT and DPO objectives through the real engine (1 process, DeepSpeed ZeRO-0 on CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from kubellm.dpo.data import read_preferences_jsonl, to_arrays
from kubellm.dpo.objective import DPOObjective, precompute_reference
from kubellm.model import Transformer
from kubellm.model.config import ModelConfig
from kubellm.sft.data import SkipReport, pack_examples, render_conversation
from kubellm.sft.objective import ExampleLoader, SFTObjective
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


def _seq_lp(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log p(labels) of one row, from full logits (the reference computation)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None]).double(), -1)[0]
    keep = labels != -100
    return logp[keep].gather(-1, labels[keep][:, None]).sum()


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
    # IPO averages each reply's log-probs over its own trained tokens (chosen "11" vs "The answer is 12.")
    ipo = DPOObjective(cached_arrays, beta=0.1, loss_type="ipo")
    batch = next(ipo.build_loader(0, 1, 8, 0))
    got, _ = ipo.loss(policy, batch)
    lp = torch.stack([torch.stack([_seq_lp(policy, batch["input_ids"][i, j], batch["labels"][i, j])
                                   for j in (0, 1)]) for i in range(8)])
    n = (batch["labels"] != -100).sum(-1).double()
    assert bool((n[:, 0] != n[:, 1]).any())  # replies of different lengths
    ref = batch["ref_logps"].double()
    h = (lp[:, 0] / n[:, 0] - lp[:, 1] / n[:, 1]) - (ref[:, 0] / n[:, 0] - ref[:, 1] / n[:, 1])
    assert got.item() == pytest.approx(float(((h - 1 / (2 * 0.1)) ** 2).mean()), rel=1e-4)


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
    from kubellm.sft.objective import packs_to_arrays
    from kubellm.training.evaluation import Evaluation

    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    convs = [[{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}"}]
             for a in range(12) for b in range(6)]
    train_ex = [render_conversation(tok, c) for c in convs[:60]]
    held = pack_examples([render_conversation(tok, c) for c in convs[60:]], 64, tok.pad_token_id)
    cfg = _cfg(len(tok))
    torch.manual_seed(2)
    start = Transformer(cfg)
    res = train(cfg, _train_cfg(15), ParallelConfig(), SFTObjective(pack_examples(train_ex, 64, tok.pad_token_id)),
                str(tmp_path / "run"), init_state_dict=start.state_dict(), resume=False,
                evaluate={"heldout": Evaluation(packs_to_arrays(held), at_start=True)})
    before, after = res.scores["start"]["heldout"]["loss"], res.scores["end"]["heldout"]["loss"]
    assert after < before - 0.5, (before, after)


def test_sft_step_is_the_mean_over_assistant_tokens_however_the_batch_is_split(
        chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    # Packs with very different numbers of assistant tokens. A mean of per-micro-batch means (the old
    # loss) weights a pack with 3 assistant tokens like one with 40, so 1 x 4 and 4 x 1 micro-batches
    # gave different gradients; the token mean over the step does not depend on the split.
    from kubellm.sft.data import IGNORE

    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    packs = _uneven_sft_packs(tok)  # one conversation each
    counts = sorted(sum(1 for x in p.labels if x != IGNORE) for p in packs)
    assert counts[-1] > 3 * counts[0], counts
    cfg = _cfg(len(tok))
    torch.manual_seed(5)
    start = Transformer(cfg).state_dict()
    runs = {}
    for micro in (4, 2, 1):
        tc = _train_cfg(2).model_copy(update={"micro_batch_size": micro, "global_batch_size": 4})
        res = train(cfg, tc, ParallelConfig(), SFTObjective(packs), str(tmp_path / f"m{micro}"),
                    init_state_dict={k: v.clone() for k, v in start.items()}, resume=False)
        runs[micro] = res
    for micro in (2, 1):
        assert runs[micro].losses == pytest.approx(runs[4].losses, rel=1e-5), micro
        for k, v in runs[4].final_state_dict.items():
            torch.testing.assert_close(runs[micro].final_state_dict[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(runs[4].final_state_dict[k], start[k]) for k in start)  # it trained


def _uneven_sft_packs(tok: object) -> list:
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "ok " * (1 + 9 * (i % 3))}]
             for i in range(8)]
    return [pack_examples([render_conversation(tok, c)], 64, tok.pad_token_id)[0] for c in convs]  # type: ignore[attr-defined]


def _sft_rank(tok_dir: str, run_dir: str, micro: int) -> tuple[list[float], str | None]:
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = _cfg(len(tok))
    torch.manual_seed(5)
    start = Transformer(cfg).state_dict()
    tc = _train_cfg(2).model_copy(update={"micro_batch_size": micro, "global_batch_size": 4})
    res = train(cfg, tc, ParallelConfig(), SFTObjective(_uneven_sft_packs(tok)), run_dir, init_state_dict=start,
                resume=False)
    if res.final_state_dict is None:
        return res.losses, None
    from safetensors.torch import save_file

    path = f"{run_dir}/final.safetensors"  # a file, not the result queue: a large result blocks the child's put
    save_file({k: v.contiguous() for k, v in res.final_state_dict.items()}, path)
    return res.losses, path


def test_sft_two_ranks_match_one_process_on_uneven_packs(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    from kubellm.training.spawn import spawn

    (ref_losses, ref_state), = spawn(_sft_rank, 1, str(chat_tokenizer_dir), str(tmp_path / "one"), 4)
    ranks = spawn(_sft_rank, 2, str(chat_tokenizer_dir), str(tmp_path / "two"), 2)
    for losses, _ in ranks:
        assert losses == pytest.approx(ref_losses, rel=1e-5)
    from safetensors.torch import load_file

    ref, two = load_file(ref_state), load_file(ranks[0][1])
    for k, v in ref.items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_padding_is_not_counted_as_trained_tokens(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    """tokens/s, tokens_seen and MFU count the tokens SFT and DPO train on, not the padding that fills
    each pack or pair up to seq_len: one epoch's tokens_seen is the data's non-pad token count."""
    from kubellm.training.metrics import read_metrics

    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    pad = tok.pad_token_id
    cfg = _cfg(len(tok))
    packs = _uneven_sft_packs(tok)  # 8 packs, one short conversation each: mostly padding
    real = sum(sum(1 for t in p.input_ids if t != pad) for p in packs)
    assert real < len(packs) * 64 - 200  # hundreds of pad positions
    pairs = to_arrays(read_preferences_jsonl([_pairs(tmp_path)], tok, 64, SkipReport()), 64, pad)[:8]
    ref = Transformer(cfg)
    precompute_reference(ref, pairs)
    real_pairs = sum(int((a["input_ids"] != pad).sum()) for a in pairs)
    for name, objective, want in (("sft", SFTObjective(packs, pad), real),
                                  ("dpo", DPOObjective(pairs, beta=0.1, pad_id=pad), real_pairs)):
        torch.manual_seed(0)
        tc = _train_cfg(2)  # 2 steps x 4 = the 8 examples once
        res = train(cfg, tc, ParallelConfig(), objective, str(tmp_path / name),
                    init_state_dict=Transformer(cfg).state_dict(), resume=False)
        assert res.metrics_path is not None
        assert read_metrics(res.metrics_path)[-1]["tokens_seen"] == want, name


def test_sft_rows_without_doc_ids_take_plain_causal_attention_with_the_same_loss() -> None:
    """A row holding one conversation needs no document mask: without doc_ids/position_ids the loss
    is the one a single-document pack (doc_ids all 0, positions 0..T-1) gives."""
    from kubellm.sft.data import IGNORE

    cfg = _cfg(300)
    torch.manual_seed(3)
    model = Transformer(cfg)
    ids = torch.randint(7, 300, (2, 32))
    labels = torch.where(torch.arange(32) < 12, torch.tensor(IGNORE), torch.roll(ids, -1, 1))
    packed = {"input_ids": ids, "labels": labels, "doc_ids": torch.zeros(2, 32, dtype=torch.long),
              "position_ids": torch.arange(32).expand(2, 32)}
    plain = {"input_ids": ids, "labels": labels}
    obj = SFTObjective([])
    with torch.no_grad():
        want, _ = obj.loss(model, packed)
        got, _ = obj.loss(model, plain)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def _ds_bf16_step0_logprobs(vocab: int) -> dict[str, list[float]]:
    """1 rank: the policy as DeepSpeed's bf16 mode holds it (the engine's CUDA config, run on the CPU
    accelerator) and the frozen reference from the same fp32 weights, fp32 or cast to `weight_dtype`."""
    import deepspeed

    from kubellm.dpo.objective import policy_logprobs
    from kubellm.training.dsconfig import deepspeed_config
    from kubellm.training.engine import weight_dtype
    from kubellm.training.optim import param_groups
    from kubellm.training.process_group import init_distributed

    init_distributed("cpu")
    tc = _train_cfg(1).model_copy(update={"precision": "bf16"})
    torch.manual_seed(0)
    model = Transformer(_cfg(vocab))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, tc.optim),
                                      config=deepspeed_config(tc, ParallelConfig(), 1, "cuda"))
    ref = Transformer(_cfg(vocab))
    ref.load_state_dict(start)
    ids = torch.randint(0, vocab, (4, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = {"policy": policy_logprobs(engine.module, ids[:, :-1], ids[:, 1:]),
               "fp32_reference": policy_logprobs(ref, ids[:, :-1], ids[:, 1:])}
        ref.to(weight_dtype(tc, "cuda"))
        out["cast_reference"] = policy_logprobs(ref, ids[:, :-1], ids[:, 1:])
    return {k: v.float().tolist() for k, v in out.items()}


@pytest.mark.integration
def test_reference_in_weight_dtype_matches_a_deepspeed_bf16_policy_at_the_start() -> None:
    """With DeepSpeed's bf16 mode (CUDA) the policy computes with bf16 weights; a reference cast to
    `weight_dtype` gives exactly its log-probs at step 0 (log-ratio 0), an fp32 one does not."""
    from kubellm.training.engine import weight_dtype
    from kubellm.training.spawn import spawn

    (r,) = spawn(_ds_bf16_step0_logprobs, 1, 97)
    assert r["cast_reference"] == r["policy"]
    assert r["fp32_reference"] != pytest.approx(r["policy"], abs=1e-4)
    assert weight_dtype(_train_cfg(1).model_copy(update={"precision": "bf16"}), "cpu") == torch.float32


def _reference_rank(tok_dir: str, prefs: str, run_dir: str, n: int) -> dict:
    """One rank of the cached-reference pass (`kubellm.dpo.stage._cached_reference`)."""
    from kubellm.dpo.config import DPOConfig
    from kubellm.dpo.stage import _cached_reference
    from kubellm.training.job import JobSpec
    from kubellm.training.process_group import init_distributed

    rank, world = init_distributed("cpu")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    arrays = to_arrays(read_preferences_jsonl([Path(prefs)], tok, 64, SkipReport()), 64, tok.pad_token_id)[:n]
    torch.manual_seed(0)
    reference = Transformer(_cfg(len(tok)))
    spec = JobSpec(stage="dpo", config={}, output=run_dir, run_dir=run_dir, parents={"model": "m"})
    ref, uri = _cached_reference(spec, lambda: reference, arrays, rank, world, DPOConfig(), "cpu")
    return {"ref": ref.tolist(), "file": np.load(uri).tolist()}


@pytest.mark.integration
def test_cached_reference_split_over_two_ranks_matches_one(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    """Each rank scores every other pair (31 pairs: an uneven split); the gathered log-probs, on every
    rank and in the file, are one process's, in pair order; a second pass reads the file back."""
    from kubellm.training.spawn import spawn

    prefs = str(_pairs(tmp_path))
    (one,) = spawn(_reference_rank, 1, str(chat_tokenizer_dir), prefs, str(tmp_path / "one"), 31)
    two = spawn(_reference_rank, 2, str(chat_tokenizer_dir), prefs, str(tmp_path / "two"), 31)
    assert len(one["ref"]) == 31 and one["file"] == one["ref"]
    for r in two:
        np.testing.assert_allclose(r["ref"], one["ref"], rtol=1e-6)
        assert r["file"] == two[0]["ref"] == r["ref"]
    again = spawn(_reference_rank, 2, str(chat_tokenizer_dir), prefs, str(tmp_path / "two"), 31)
    assert [r["ref"] for r in again] == [two[0]["ref"]] * 2
