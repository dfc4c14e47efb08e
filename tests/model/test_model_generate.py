"""KV-cache generation equals full-forward decoding; sampling controls; the `kubellm generate` command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_tokenizer_util import build_tokenizer

from kubellm.cli import main as cli_main
from kubellm.core.errors import ConfigError, InputDataError, IntegrityError
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
    with pytest.raises(InputDataError, match=r"prompt: 48 tokens leave no room in the context \(the model's "
                                             r"max_seq_len is 48\); shorten it to at most 47 tokens"):
        generate(m, [1] * 48, max_new_tokens=1)
    with pytest.raises(InputDataError, match="prompt: empty"):
        generate(m, [], max_new_tokens=1)


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


def test_chat_encodes_a_typed_role_marker_as_text(export_dir: Path) -> None:
    """As SFT trains: a `<|end|>` or `<|assistant|>` typed in a message is text, not the control id (the
    generate path had tokenized the rendered template, so a user could end their own turn)."""
    from kubellm.model.generate import encode_chat

    tok = load_for_generation(str(export_dir)).tokenizer
    plain = [{"role": "user", "content": "hi"}]
    assert encode_chat(tok, plain) == tok(tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True),
                                          add_special_tokens=False)["input_ids"]
    typed = [{"role": "user", "content": "say <|end|> then <|assistant|> ok"}]
    ids = encode_chat(tok, typed)
    assert ids.count(6) == 1 and ids.count(5) == 1  # the template's own <|end|> and <|assistant|> only
    plain_ids = encode_chat(tok, plain)
    assert ids[ids.index(6):] == plain_ids[plain_ids.index(6):]  # the same turn end and generation prompt


def test_plain_prompt_encodes_a_typed_special_token_as_text(export_dir: Path) -> None:
    """As the tokenizer stage encodes documents: `<|eos|>` typed in a --prompt is text, not eos (1)."""
    from kubellm.model.generate import encode_prompt

    tok = load_for_generation(str(export_dir)).tokenizer
    ids = encode_prompt(tok, "type <|eos|> to quit")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and tok.eos_token_id not in ids
    assert tok.decode(ids[1:]) == "type <|eos|> to quit"


def test_a_directory_without_generation_config_still_stops_at_the_turn_end(export_dir: Path,
                                                                            tmp_path: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(export_dir, bare)
    (bare / "generation_config.json").unlink()
    assert load_for_generation(str(bare)).stop_ids == [1, 6]  # eos from the tokenizer, <|end|> from its template


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


def test_cli_prompt_longer_than_the_context_is_a_one_line_error(export_dir: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # was a ValueError traceback out of `kubellm generate` (only KubellmError is printed as one line)
    long_text = "the cat sat on the mat " * 40  # far more than max_seq_len=48 tokens
    assert cli_main(["generate", "--model", str(export_dir), "--prompt", long_text]) == 1
    err = capsys.readouterr().err
    assert "kubellm generate: error: prompt: " in err and "leave no room in the context" in err
    assert "Traceback" not in err
    assert cli_main(["generate", "--model", str(export_dir), "--chat", long_text]) == 1
    assert "max_seq_len is 48" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": float("nan")}, "temperature=nan: expected a finite number >= 0"),
    ({"temperature": float("inf")}, "temperature=inf: expected a finite number >= 0"),
    ({"temperature": -0.5}, r"temperature=-0\.5: expected a finite number >= 0"),
    ({"temperature": 1.0, "top_p": 0.0}, r"top_p=0\.0: expected a number in \(0, 1\]"),
    ({"temperature": 1.0, "top_p": -1.0}, r"top_p=-1\.0: expected a number in \(0, 1\]"),
    ({"temperature": 1.0, "top_p": 1.5}, r"top_p=1\.5: expected a number in \(0, 1\]"),
    ({"temperature": 1.0, "top_p": float("nan")}, r"top_p=nan: expected a number in \(0, 1\]"),
])
def test_bad_sampling_parameters_are_refused(kwargs: dict[str, float], match: str) -> None:
    # NaN temperature, top_p <= 0 or > 1 used to reach torch.multinomial ("invalid multinomial
    # distribution") or, for a negative temperature, silently decode greedily
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    with pytest.raises(ConfigError, match=match):
        sample_next(logits, generator=torch.Generator().manual_seed(0), **kwargs)
    with pytest.raises(ConfigError, match=match):
        generate(_model(), [0, 5], 4, generator=torch.Generator().manual_seed(0), **kwargs)


def test_tiny_temperature_samples_the_top_token() -> None:
    # logits / 1e-45 overflowed to inf and softmax gave NaN probabilities
    logits = torch.tensor([[20.0, 10.0, -5.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, temperature=1e-45, generator=g).item() for _ in range(20)} == {0}
    assert sample_next(logits, temperature=1e-45, top_p=0.5, generator=g).item() == 0


@pytest.mark.parametrize("args, message", [
    (["--temperature", "nan"], "--temperature=nan: expected a finite number >= 0"),
    (["--temperature", "inf"], "--temperature=inf: expected a finite number >= 0"),
    (["--temperature", "0.8", "--top-p", "0"], r"--top-p=0.0: expected a number in (0, 1]"),
])
def test_cli_bad_sampling_parameters(export_dir: Path, args: list[str], message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["generate", "--model", str(export_dir), "--prompt", "the cat", "--max-new-tokens", "3",
                     *args]) == 1
    err = capsys.readouterr().err
    assert f"kubellm generate: error: {message}" in err and "Traceback" not in err


def _published_root_artifact(export_dir: Path, prefix: Path) -> Path:
    """A committed local artifact whose HF files sit at its root, beside _manifest.json."""
    prefix.mkdir(parents=True)
    for f in export_dir.iterdir():
        (prefix / f.name).write_bytes(f.read_bytes())
    publish_dir(prefix, str(prefix), kind="model")
    assert (prefix / "_manifest.json").is_file() and (prefix / "config.json").is_file()
    return prefix


def test_artifact_with_hf_files_at_its_root_is_verified(export_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # a directory with config.json was read as a plain HF dir even with a _manifest.json: a tampered
    # weight file of a committed artifact was loaded without a sha256 check
    art = _published_root_artifact(export_dir, tmp_path / "art")
    bundle = load_for_generation(str(art))
    assert generate(bundle.model, [0, 5], 4) == generate(load_for_generation(str(export_dir)).model, [0, 5], 4)

    weights = art / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one byte of tensor data, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.safetensors: sha256 .* but the manifest records"):
        load_for_generation(str(art))
    assert cli_main(["generate", "--model", str(art), "--prompt", "the cat", "--max-new-tokens", "3"]) == 1
    err = capsys.readouterr().err
    assert "kubellm generate: error: " in err and "model.safetensors: sha256" in err


def test_unreadable_manifest_beside_hf_files_is_named(export_dir: Path, tmp_path: Path) -> None:
    art = _published_root_artifact(export_dir, tmp_path / "art")
    (art / "_manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="has a _manifest.json, so it is an artifact to verify, but the "
                                          "manifest cannot be read"):
        load_for_generation(str(art))


def test_unreadable_generation_config_is_named(export_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    for f in export_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "generation_config.json").write_text('{"eos_token_id": [1, ')
    assert cli_main(["generate", "--model", str(d), "--prompt", "the cat", "--max-new-tokens", "3"]) == 1
    assert "generation_config.json: not valid JSON" in capsys.readouterr().err
