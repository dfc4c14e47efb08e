"""Run-config: presets, strict validation with errors naming the field, overrides, CLI help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kubellm.core.errors import ConfigError
from kubellm.runconfig import RunConfig, load_run_config, load_section


def test_presets_load_and_match_the_seed_document() -> None:
    seed = load_run_config(preset="seed")
    m = seed.pretrain.model.build()
    assert (m.vocab_size, m.dim, m.n_heads, m.ffn_dim, m.n_layers) == (10000, 128, 8, 256, 6)
    assert seed.pretrain.train.optim.lr == 1e-3
    from kubellm.model.flops import num_params

    debug = load_run_config(preset="debug")
    assert num_params(debug.pretrain.model.build()) < num_params(m)  # the demo's model is the smaller one


@pytest.mark.parametrize(
    "override, expected",
    [
        ("pretrain.train.zero_stage=4", r"pretrain\.train\.zero_stage: Input should be 0, 1, 2 or 3"),
        ("pretrain.train.precision=fp8", r"pretrain\.train\.precision: Input should be 'fp32', 'bf16' or 'fp16'"),
        ("tokenizer.vocab_size=ten", r"tokenizer\.vocab_size: Input should be a valid integer"),
        ("sft.trian.max_steps=3", r"sft\.trian: unknown key"),
        ("pretrain.model.preset=13b", r"pretrain\.model: Value error, unknown preset '13b'; allowed: debug"),
        ("pretrain.model.overrides={n_heads: 5}", r"n_heads=5 must divide dim=64"),
    ],
)
def test_bad_values_name_the_field(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_run_config(preset="debug", overrides=[override])


def test_file_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("name: mine\ndpo: {beta: 0.5}\n")
    cfg = load_run_config(f, preset="debug", overrides=["dpo.beta=0.25"])
    assert cfg.name == "mine" and cfg.dpo.beta == 0.25
    assert cfg.pretrain.model.preset == "debug"  # the preset survives the merge


def test_override_values_keep_what_was_typed() -> None:
    """`--set` values are YAML, except where YAML 1.1 would change or refuse the text: a glob stays a
    glob (was a raw ScannerError traceback), `010` stays ten (was octal 8), `off` stays text."""
    cfg = load_run_config(preset="debug", overrides=["sources.raw=*.jsonl", "pretrain.train.max_steps=010",
                                                     "dpo.beta=1e-1", "name=off", "sft.train.seed=0x10"])
    assert cfg.sources.raw == "*.jsonl" and cfg.pretrain.train.max_steps == 10 and cfg.dpo.beta == 0.1
    assert cfg.name == "off" and cfg.sft.train.seed == 16
    from kubellm.core.config import parse_override_value as parse

    assert [parse(v) for v in ("1:30", "a #b", "[1, 2]", "null", "true", "")] == ["1:30", "a #b", [1, 2], None, True, ""]
    assert [parse(v) for v in ('"Run #1"', "-0x10", "0b101", "+5")] == ["Run #1", -16, 5, 5]  # as YAML reads them


def test_override_values_keep_what_was_typed_inside_lists_and_mappings_and_for_dates() -> None:
    # YAML 1.1's readings had been undone at the top level only, and dates not at all: a directory
    # named by date (`--set sources.raw=2024-06-01`) failed as "not a valid string (got datetime.date)"
    from kubellm.core.config import parse_override_value as parse

    assert parse("[010, off, 1:30, 2024-01-01]") == ["010", "off", "1:30", "2024-01-01"]
    assert parse("{name: no, when: 2024-01-01T10:00:00, n: 1_000}") == {"name": "no", "when": "2024-01-01T10:00:00",
                                                                        "n": "1_000"}
    assert parse("[1, 2.5, .5, 1e3, true, null, 0o17]") == [1, 2.5, 0.5, 1000.0, True, None, 15]
    cfg = load_run_config(preset="debug", overrides=["sources.raw=2024-06-01"])
    assert cfg.sources.raw == "2024-06-01"


def test_a_key_written_twice_in_a_run_config_is_refused(tmp_path: Path) -> None:
    # the second `pretrain:` had silently replaced the first, dropping its max_steps
    f = tmp_path / "rc.yaml"
    f.write_text("pretrain: {train: {max_steps: 5}}\nname: x\npretrain: {model: {preset: seed}}\n")
    with pytest.raises(ConfigError, match=r"(?s)rc\.yaml: not valid YAML.*duplicate key 'pretrain' \(first at line 1\)"):
        load_run_config(f)
    f.write_text("dpo:\n  beta: 0.1\n  beta: 0.2\n")
    with pytest.raises(ConfigError, match="duplicate key 'beta'"):
        load_run_config(f)
    # YAML merge keys still work (the check runs after they are flattened); an unhashable key is a
    # YAML error naming the file, not a bare TypeError
    f.write_text("x-train: &t {max_steps: 7, seed: 3}\npretrain:\n  train:\n    <<: *t\n    seq_len: 32\n    seed: 4\n")
    from kubellm.core.config import read_yaml

    assert read_yaml(f)["pretrain"]["train"] == {"max_steps": 7, "seq_len": 32, "seed": 4}  # a written key wins
    f.write_text("{[1, 2]: 3}\n")
    with pytest.raises(ConfigError, match=r"(?s)rc\.yaml: not valid YAML.*unhashable key"):
        load_run_config(f)


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_run_config(f)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_run_config(tmp_path / "missing.yaml")
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 9"):
        load_run_config(tmp_path / "latin1.yaml")
    with pytest.raises(ConfigError, match=r": cannot read the config file"):
        load_run_config(tmp_path)  # a directory


def test_a_file_over_a_preset_merges_as_a_param_does(tmp_path: Path) -> None:
    """Config models merge key by key; a free-form mapping in the file (gate rules) replaces the preset's,
    as `--param evaluate_config=...` does: it had been merged key by key, so a file could not drop a rule."""
    f = tmp_path / "run.yaml"
    f.write_text("evaluate:\n  gate:\n    rules:\n      kubellm_knowledge: {max_drop: 0.01}\n"
                 "pretrain:\n  train: {max_steps: 7}\n  model: {overrides: {n_layers: 6}}\n")
    cfg = load_run_config(f, preset="debug")
    assert set(cfg.evaluate.gate.rules) == {"kubellm_knowledge"}
    assert cfg.evaluate.gate.rules["kubellm_knowledge"].max_drop == 0.01
    preset = load_run_config(preset="debug")
    assert cfg.pretrain.train.max_steps == 7 and cfg.pretrain.train.seq_len == preset.pretrain.train.seq_len
    assert cfg.evaluate.gate.enabled == preset.evaluate.gate.enabled
    # a plain mapping (the model overrides) merges key by key: the preset's other overrides stay
    assert cfg.pretrain.model.overrides == {**preset.pretrain.model.overrides, "n_layers": 6}
    assert len(preset.pretrain.model.overrides) > 1


def test_sections_hash_independently() -> None:
    a = load_run_config(preset="debug")
    b = load_run_config(preset="debug", overrides=["dpo.beta=0.3"])
    assert a.pretrain.config_hash() == b.pretrain.config_hash()
    assert a.dpo.config_hash() != b.dpo.config_hash()
    sec = load_section("dpo", {"beta": 0.2}, "kfp-param")
    assert sec.beta == 0.2  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"dpo\.beta"):
        load_section("dpo", {"beta": -1}, "kfp-param")


def test_every_field_is_documented() -> None:
    from pydantic import BaseModel

    def walk(model: type[BaseModel], path: str) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{path}{name}")
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                missing += walk(ann, f"{path}{name}.")
        return missing

    undocumented = [m for m in walk(RunConfig, "") if m not in ("storage", "data_prep", "tokenizer",
                                                                 "pretrain", "sft", "dpo", "evaluate")]
    assert undocumented == []


def test_cli_help_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "kubellm.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in ("data-prep", "tokenizer", "pretrain", "sft", "dpo", "evaluate", "run", "compile",
                "submit", "schedule", "plan", "generate"):
        assert f"    {cmd} " in out or f"    {cmd}\n" in out, cmd


def test_stage_cli_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "kubellm.cli", "dpo", "--preset", "debug", "--set",
                        "dpo.beta=-1", "--input", "model=x", "--input", "preferences=y",
                        "--output", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "dpo.beta" in r.stderr and "Traceback" not in r.stderr
