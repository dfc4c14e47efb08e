"""What a post-training run may reuse: run dirs, checkpoints and cached reference log-probs belong to
one stage, one starting model and one dataset."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kubellm.core.errors import ConfigError
from kubellm.runconfig import load_run_config
from kubellm.stages import run_stage
from tests.post.test_post_stages import FAST, _base, _write

CHAT = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": f"{a + b}"}]} for a in range(6) for b in range(4)]
PREFS = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}", "rejected": f"It is {a + b + 2}, I think."}
         for a in range(6) for b in range(4)]


def _cfg(*extra: str):  # noqa: ANN202
    return load_run_config(preset="debug", overrides=[o.format(s=s) for s in ("sft", "dpo") for o in FAST]
                           + list(extra))


def test_one_run_id_gives_each_stage_its_own_run_and_other_inputs_are_refused(
        chat_tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBELLM_RUN_ID", "shared")
    base = _base(chat_tokenizer_dir, tmp_path)
    chat = _write(tmp_path / "chat" / "train.jsonl", CHAT)
    prefs = _write(tmp_path / "prefs" / "train.jsonl", PREFS)
    cfg, out = _cfg(), str(tmp_path / "art")

    sft = run_stage("sft", cfg.sft, {"model": str(base), "chat": str(chat)}, out)
    dpo = run_stage("dpo", cfg.dpo, {"model": sft.uri, "preferences": str(prefs)}, out)
    # before: DPO resumed SFT's final checkpoint from the shared run dir and published SFT's weights
    assert sft.metadata["run_dir"].endswith("/runs/sft-shared")
    assert dpo.metadata["run_dir"].endswith("/runs/dpo-shared")
    w_sft = load_file(str(Path(sft.uri) / "hf" / "model.safetensors"))
    w_dpo = load_file(str(Path(dpo.uri) / "hf" / "model.safetensors"))
    assert any(not torch.equal(w_sft[k], w_dpo[k]) for k in w_sft)
    assert dpo.metrics["loss_start"] == pytest.approx(math.log(2), abs=1e-3)

    # the same run id with other preference data: the run dir's checkpoints were trained on the old
    # pairs; resuming them would publish that run's weights (and its cached reference) as this one's
    swapped = _write(tmp_path / "swapped" / "train.jsonl",
                     [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in PREFS])
    with pytest.raises(ConfigError, match=r"another stage or on other inputs.*input:preferences"):
        run_stage("dpo", cfg.dpo, {"model": sft.uri, "preferences": str(swapped)}, out)


def test_a_plain_hf_directory_is_identified_by_its_files(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    from kubellm.training.model_stage import fetch_model

    base = _base(chat_tokenizer_dir, tmp_path)
    before = fetch_model(str(base)).digest
    assert fetch_model(str(base)).digest == before  # stable while nothing changes
    torch.manual_seed(1)  # re-export another model into the same directory
    w = load_file(str(base / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: torch.randn_like(v) for k, v in w.items()}, str(base / "model.safetensors"),
              metadata={"format": "pt"})
    assert fetch_model(str(base)).digest != before  # before: the path, so SFT reused the old artifact


def test_cached_reference_scores_in_the_training_precision(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    # The policy's first forward runs under bf16 autocast; a reference cached in fp32 made the first
    # loss differ from log 2 (0.693159 vs 0.693147 here) and the rewards non-zero at step 0.
    base = _base(chat_tokenizer_dir, tmp_path)
    prefs = _write(tmp_path / "prefs" / "train.jsonl", PREFS)
    cfg = _cfg("dpo.train.precision=bf16", "dpo.reference=cached")
    dpo = run_stage("dpo", cfg.dpo, {"model": str(base), "preferences": str(prefs)}, str(tmp_path / "art"))
    assert dpo.metrics["loss_start"] == pytest.approx(math.log(2), abs=1e-6)
    assert "/reference/ref_logps-" in dpo.metadata["reference_logps"]


def test_reference_cache_key_follows_model_pairs_and_precision() -> None:
    from kubellm.dpo.config import DPOConfig
    from kubellm.dpo.stage import reference_uri
    from kubellm.training.job import JobSpec

    spec = JobSpec(stage="dpo", config={}, output="/o", run_dir="/o/runs/dpo-x", parents={"model": "m1"})
    pairs = [{"input_ids": np.arange(8, dtype=np.int64).reshape(2, 4), "labels": np.ones((2, 4), np.int64)}]
    cfg = DPOConfig()
    key = reference_uri(spec, pairs, cfg, "cpu")
    swapped = [{"input_ids": pairs[0]["input_ids"][::-1].copy(), "labels": pairs[0]["labels"]}]
    assert reference_uri(spec, swapped, cfg, "cpu") != key
    assert reference_uri(spec.model_copy(update={"parents": {"model": "m2"}}), pairs, cfg, "cpu") != key
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": "bf16"})})
    assert reference_uri(spec, pairs, other, "cpu") != key
    assert reference_uri(spec, pairs, cfg, "cpu") == key


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_bad_record_in_s3_data_is_named_by_its_s3_uri(chat_tokenizer_dir: Path, tmp_path: Path, s3_bucket: str,
                                                      stage: str) -> None:
    # before: the message named the downloaded copy (/tmp/kubellm-sft-…/train.jsonl:2)
    import json

    from kubellm.core.errors import InputDataError
    from kubellm.core.storage import storage_for

    base = _base(chat_tokenizer_dir, tmp_path)
    rows = CHAT[:3] if stage == "sft" else PREFS[:3]
    uri = f"{s3_bucket}/{stage}/en/train.jsonl"
    storage_for(uri).write_bytes(uri, ("\n".join([json.dumps(rows[0]), "{not json", json.dumps(rows[1])]) + "\n").encode())
    cfg = _cfg(f"{stage}.on_bad_record=fail")
    key = "chat" if stage == "sft" else "preferences"
    with pytest.raises(InputDataError, match=rf"{uri}:2\b"):
        run_stage(stage, getattr(cfg, stage), {"model": str(base), key: uri}, str(tmp_path / "art"))


def test_a_tokenizer_without_pad_token_is_refused_by_name(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    """A plain HF directory whose tokenizer has no pad token (Llama-3-Instruct style): SFT names it
    instead of failing on a None in the packed ids."""
    import json

    from kubellm.core.errors import InputDataError

    base = _base(chat_tokenizer_dir, tmp_path)
    tc = base / "tokenizer_config.json"
    tc.write_text(json.dumps({k: v for k, v in json.loads(tc.read_text()).items() if k != "pad_token"}))
    for extra in ("special_tokens_map.json",):
        if (base / extra).is_file():
            m = json.loads((base / extra).read_text())
            m.pop("pad_token", None)
            (base / extra).write_text(json.dumps(m))
    chat = _write(tmp_path / "chat" / "train.jsonl", CHAT)
    with pytest.raises(InputDataError, match=r"the model's tokenizer has no pad_token .*set `pad_token`"):
        run_stage("sft", _cfg().sft, {"model": str(base), "chat": str(chat)}, str(tmp_path / "art"))
