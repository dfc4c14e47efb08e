"""The SFT and DPO stages end to end (1 process): base export -> SFT artifact -> DPO artifact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kubellm.core.errors import InputDataError
from kubellm.core.manifest import read_manifest
from kubellm.model import Transformer
from kubellm.model.config import ModelConfig
from kubellm.model.hf import export_hf
from kubellm.runconfig import load_run_config
from kubellm.stages import run_stage

FAST = ["{s}.train.max_steps=6", "{s}.train.micro_batch_size=4", "{s}.train.global_batch_size=4",
        "{s}.train.seq_len=64", "{s}.train.progress_bar=false", "{s}.train.tensorboard=false",
        "{s}.train.device=cpu", "{s}.launch.nproc_per_node=1"]


def _base(tok_dir: Path, tmp: Path) -> Path:
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(tok_dir))
    cfg = ModelConfig(vocab_size=n, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    torch.manual_seed(0)
    out = tmp / "base"
    export_hf(Transformer(cfg), cfg, out, tokenizer_dir=tok_dir)
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_sft_then_dpo_stages(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    base = _base(chat_tokenizer_dir, tmp_path)
    chat = _write(tmp_path / "chat" / "train.jsonl", [
        {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": f"{a + b}"}]} for a in range(10) for b in range(5)]
        + [{"messages": [{"role": "user", "content": "no answer"}]}])
    prefs = _write(tmp_path / "prefs" / "train.jsonl", [
        {"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}", "rejected": f"It is {a + b + 2}, I think."}
        for a in range(6) for b in range(4)] + [{"prompt": "x", "chosen": "same", "rejected": "same"}])
    cfg = load_run_config(preset="debug", overrides=[o.format(s=s) for s in ("sft", "dpo") for o in FAST])
    out = str(tmp_path / "art")

    sft = run_stage("sft", cfg.sft, {"model": str(base), "chat": str(chat)}, out)
    assert sft.kind == "model" and sft.counts["skipped_records"] == 1
    assert sft.metrics["heldout_assistant_loss_after"] < sft.metrics["heldout_assistant_loss_before"]
    assert "no_assistant_turn" in sft.report_markdown
    hf_dir = Path(sft.uri) / "hf"
    assert AutoModelForCausalLM.from_pretrained(hf_dir) is not None
    # the same config on the same inputs reuses the committed artifact (content address)
    assert run_stage("sft", cfg.sft, {"model": str(base), "chat": str(chat)}, out).digest() == sft.digest()

    dpo = run_stage("dpo", cfg.dpo, {"model": sft.uri, "preferences": str(prefs)}, out)
    assert dpo.metrics["loss_start"] == pytest.approx(0.6931, abs=1e-3)
    assert dpo.metrics["final_reward_accuracy"] > 0.5
    # pairs 0, 10 and 20 of the 24 usable ones are held out of training and scored after it
    assert dpo.counts == {**dpo.counts, "pairs": 21, "heldout_pairs": 3, "skipped_records": 1}
    assert dpo.metrics["heldout_reward_accuracy"] > 0.5 and dpo.metrics["heldout_reward_margin"] > 0
    assert dpo.metrics["heldout_loss"] < math.log(2)  # below the loss at the start, where policy = reference
    assert "| held out | 3 |" in dpo.report_markdown and "| trained on | 21 |" in dpo.report_markdown
    assert read_manifest(dpo.uri).parents["model"] == sft.digest()


def test_fail_policy_names_the_record(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    base = _base(chat_tokenizer_dir, tmp_path)
    prefs = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                          {"prompt": "", "chosen": "a", "rejected": "b"}])
    cfg = load_run_config(preset="debug", overrides=[o.format(s="dpo") for o in FAST] + ["dpo.on_bad_record=fail"])
    with pytest.raises(InputDataError, match=r"p.jsonl:2: empty prompt"):
        run_stage("dpo", cfg.dpo, {"model": str(base), "preferences": str(prefs)}, str(tmp_path / "art"))


def test_batch_that_does_not_divide_is_refused_before_launch(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    from kubellm.core.errors import ConfigError

    base = _base(chat_tokenizer_dir, tmp_path)
    chat = _write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": "a"}]}])
    cfg = load_run_config(preset="debug", overrides=["sft.launch.nproc_per_node=2", "sft.train.global_batch_size=4",
                                                     "sft.train.micro_batch_size=4", "sft.train.seq_len=64"])
    with pytest.raises(ConfigError, match=r"global_batch_size=4 is not divisible"):
        run_stage("sft", cfg.sft, {"model": str(base), "chat": str(chat)}, str(tmp_path / "art"))


QA = [{"messages": [{"role": "user", "content": f"What is {a} plus 1?"}, {"role": "assistant", "content": f"{a + 1}"}]}
      for a in range(8)]
PAIRS = [{"prompt": f"What is {a} plus 1?", "chosen": f"{a + 1}", "rejected": f"{a + 3}"} for a in range(8)]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_seq_len_beyond_the_model_is_refused_before_data_is_read(chat_tokenizer_dir: Path, tmp_path: Path,
                                                                 stage: str) -> None:
    # before: a raw ValueError from assistant_token_loss / precompute_reference after the data was read
    from kubellm.core.errors import ConfigError

    base = _base(chat_tokenizer_dir, tmp_path)  # max_seq_len=64
    data = _write(tmp_path / "d.jsonl", QA if stage == "sft" else PAIRS)
    cfg = load_run_config(preset="debug", overrides=[o.format(s=stage) for o in FAST] + [f"{stage}.train.seq_len=128"])
    inputs = {"model": str(base), ("chat" if stage == "sft" else "preferences"): str(data)}
    with pytest.raises(ConfigError, match=rf"{stage}.train.seq_len=128 exceeds the model's max_seq_len=64"):
        run_stage(stage, getattr(cfg, stage), inputs, str(tmp_path / "art"))


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_no_usable_records_names_the_source_and_the_skips(chat_tokenizer_dir: Path, tmp_path: Path,
                                                          stage: str) -> None:
    # before: "0 packed sequences cannot fill one micro-batch ... lower train.micro_batch_size"
    base = _base(chat_tokenizer_dir, tmp_path)
    rows = ([{"messages": [{"role": "user", "content": "no answer"}]}, {"messages": "x"}] if stage == "sft"
            else [{"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": 5, "chosen": "a", "rejected": "b"}])
    data = _write(tmp_path / "bad.jsonl", rows)
    cfg = load_run_config(preset="debug", overrides=[o.format(s=stage) for o in FAST])
    inputs = {"model": str(base), ("chat" if stage == "sft" else "preferences"): str(data)}
    what = "conversations" if stage == "sft" else "preference pairs"
    reasons = ("malformed_record: 1, no_assistant_turn: 1" if stage == "sft"
               else "identical_pair: 1, prompt_not_text_or_messages: 1")
    with pytest.raises(InputDataError, match=rf"bad.jsonl: 0 usable {what} found \(2 record\(s\) skipped: {reasons}\)"):
        run_stage(stage, getattr(cfg, stage), inputs, str(tmp_path / "art"))
    data.write_text("")  # an empty file
    with pytest.raises(InputDataError, match=rf"bad.jsonl: 0 usable {what} found \(0 record\(s\) skipped: none\)"):
        run_stage(stage, getattr(cfg, stage), inputs, str(tmp_path / "art"))


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_source_with_every_record_held_out_says_so(stage: str, chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    base = _base(chat_tokenizer_dir, tmp_path)
    record = QA[:1] if stage == "sft" else [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    data = _write(tmp_path / "one.jsonl", record)
    cfg = load_run_config(preset="debug", overrides=[o.format(s=stage) for o in FAST])
    inputs = {"model": str(base), "chat" if stage == "sft" else "preferences": str(data)}
    what = "conversation" if stage == "sft" else "preference pair"
    with pytest.raises(InputDataError, match=rf"one.jsonl: only 1 usable {what}\(s\), all held out \(heldout_every=10\)"):
        run_stage(stage, getattr(cfg, stage), inputs, str(tmp_path / "art"))
