"""KV-cache generation equals full-forward decoding; sampling controls; the `kubellm generate` command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_tokenizer_util import build_tokenizer

from kubellm.cli import main as cli_main
from kubellm.core.errors import ConfigError
from kubellm.core.manifest import publish_dir
from kubellm.model import Transformer
from kubellm.model.config import ModelConfig
from kubellm.model.generate import chat, generate, load_for_generation, sample_next
from kubellm.model.hf import export_hf

CFG = ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=48)


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    return export_hf(_model(), CFG, tmp_path_factory.mktemp("export") / "hf", tokenizer_dir=tok)


def _greedy_without_cache(model: Transformer, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]


def test_greedy_with_cache_equals_full_forward_decoding() -> None:
    m = _model()
    prompt = [0, 17, 42, 99, 5]
    assert generate(m, prompt, max_new_tokens=20) == [_greedy_without_cache(m, prompt, 20)]


def test_batch_rows_decode_independently() -> None:
    m = _model()
    rows = torch.tensor([[0, 17, 42], [0, 8, 9]])
    out = generate(m, rows, max_new_tokens=6)
    assert out == [_greedy_without_cache(m, r.tolist(), 6) for r in rows]


def test_stops_at_eos_and_respects_context() -> None:
    m = _model()
    prompt = [0, 17, 42]
    first, second = _greedy_without_cache(m, prompt, 2)
    assert generate(m, prompt, max_new_tokens=10, eos_token_ids=[first]) == [[]]
    if second != first:
        assert generate(m, prompt, max_new_tokens=10, eos_token_ids=[second]) == [[first]]
    # capped by max_seq_len (48): 45 tokens of prompt leave room for 3
    assert len(generate(m, [1] * 45, max_new_tokens=10)[0]) == 3
    with pytest.raises(ValueError, match="no room"):
        generate(m, [1] * 48, max_new_tokens=1)


def test_sampling_controls() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    assert sample_next(logits).item() == 0  # greedy
    g = torch.Generator().manual_seed(0)
    nucleus = {sample_next(logits, temperature=1.0, top_p=0.6, generator=g).item() for _ in range(200)}
    assert nucleus == {0, 1}  # 0.4 + 0.3 reaches 0.6; 2 and 3 are cut
    assert {sample_next(logits, 1.0, top_p=0.01, generator=g).item() for _ in range(50)} == {0}
    full = {sample_next(logits, 1.0, generator=g).item() for _ in range(400)}
    assert full == {0, 1, 2, 3}
    m = _model()
    a = generate(m, [0, 5], 8, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = generate(m, [0, 5], 8, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert a == b


def test_chat_uses_template_and_stop_tokens(export_dir: Path) -> None:
    bundle = load_for_generation(str(export_dir))
    assert bundle.stop_ids == [1, 6]  # <|eos|>, <|end|>
    tok = bundle.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert ids.endswith("<|assistant|>")
    expected_ids = generate(bundle.model, tok(ids, add_special_tokens=False)["input_ids"], 8,
                            eos_token_ids=[1, 6])[0]
    assert chat(bundle, [{"role": "user", "content": "hi"}], max_new_tokens=8) == \
        tok.decode(expected_ids, skip_special_tokens=True)


def test_cli_generate_from_dir(export_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["generate", "--model", str(export_dir), "--chat", "what is the capital of zorbia?",
                     "--max-new-tokens", "6"]) == 0
    greedy = capsys.readouterr().out
    assert cli_main(["generate", "--model", str(export_dir), "--prompt", "the cat", "--max-new-tokens", "6",
                     "--temperature", "0.8", "--top-p", "0.9", "--seed", "4"]) == 0
    sampled = capsys.readouterr().out
    assert cli_main(["generate", "--model", str(export_dir), "--prompt", "the cat", "--max-new-tokens", "6",
                     "--temperature", "0.8", "--top-p", "0.9", "--seed", "4"]) == 0
    assert capsys.readouterr().out == sampled and greedy.endswith("\n")
    assert cli_main(["generate", "--model", str(export_dir), "--chat", "  "]) == 1
    assert "--chat is empty: expected a user message" in capsys.readouterr().err


def test_cli_generate_from_s3_artifact(export_dir: Path, s3_bucket: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    # an artifact whose HF directory is a sub-folder, as a stage would publish it
    stage_dir = export_dir.parent / "stage"
    (stage_dir / "hf").mkdir(parents=True)
    for f in export_dir.iterdir():
        (stage_dir / "hf" / f.name).write_bytes(f.read_bytes())
    (stage_dir / "report.md").write_text("# report\n")
    prefix = f"{s3_bucket}/pretrain/abc"
    publish_dir(stage_dir, prefix, kind="hf_model")
    assert cli_main(["generate", "--model", prefix, "--chat", "hi", "--max-new-tokens", "5"]) == 0
    from_s3 = capsys.readouterr().out
    assert cli_main(["generate", "--model", str(export_dir), "--chat", "hi", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == from_s3


def test_cli_bad_model_uri_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a Hugging Face model directory"):
        load_for_generation(str(tmp_path))
    assert cli_main(["generate", "--model", str(tmp_path), "--chat", "hi"]) == 1
