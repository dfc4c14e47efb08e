"""kubellm plan's fragment names the model it was planned for (`pretrain.model`: preset + the
overrides the estimate assumed) and is accepted, as written, by the pretrain stage's pre-launch checks
and the worker's `validate_layout`."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubellm.cli import main as cli_main
from kubellm.core.manifest import FileEntry, Manifest
from kubellm.model.config import ModelConfig, get_preset
from kubellm.runconfig import load_run_config
from kubellm.training.dsconfig import deepspeed_config
from kubellm.training.planner import model_for_params, model_spec
from kubellm.training.topology import validate_layout

PLANS = {
    "7b-gpus3": ["--model", "7b", "--gpus", "3"],
    "1b-seq4096": ["--model", "1b", "--gpus", "8", "--seq-len", "4096"],
    "125m-gpus8": ["--model", "125m", "--gpus", "8"],
    "125m-gpus3-8gib-batch3": ["--model", "125m", "--gpus", "3", "--gpu-mem-gb", "8", "--global-batch", "3"],
    "params3e9-gpus16": ["--params", "3e9", "--gpus", "16"],
    "params2e8-seq8192": ["--params", "2e8", "--gpus", "2", "--seq-len", "8192"],
}


def _flag(args: list[str], name: str, default: str) -> str:
    return args[args.index(name) + 1] if name in args else default


def _planned_model(args: list[str]) -> ModelConfig:
    """The model the planner estimates for: the preset (or the Llama-shaped --params model) with
    max_seq_len raised to --seq-len."""
    cfg = get_preset(args[1]) if args[0] == "--model" else model_for_params(float(args[1]))
    return cfg.with_(max_seq_len=max(cfg.max_seq_len, int(_flag(args, "--seq-len", "2048"))))


@pytest.mark.parametrize("args", PLANS.values(), ids=PLANS.keys())
def test_fragment_is_the_planned_model_and_pretrain_accepts_it(args: list[str], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from kubellm.pretrain.stage import _check as pretrain_prelaunch_check

    out = tmp_path / "plan.yaml"
    assert cli_main(["plan", *args, "--output", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    config = load_run_config(out).pretrain
    model = config.model.build()
    assert model == _planned_model(args)
    # the fragment is the layout printed first
    p, t = config.parallel, config.train
    assert printed[1].startswith(f"1. dp={p.dp} tp={p.tp} pp={p.pp} zero={t.zero_stage} micro={t.micro_batch_size} ")
    world = config.launch.nproc_per_node * config.launch.nnodes
    assert world == int(_flag(args, "--gpus", "0"))
    # the pretrain stage's pre-launch checks, then the worker's
    tokens = Manifest(kind="token_shards", uri=str(tmp_path / "tokens"), metadata={"vocab_size": model.vocab_size},
                      files=[FileEntry(path="train/00000.tok", size=8, sha256="0" * 64)])
    pretrain_prelaunch_check(config, tokens)
    resolved = validate_layout(model, config.train, config.parallel, world)
    assert deepspeed_config(config.train, resolved, world, "cuda")["train_batch_size"] == t.global_batch_size


def test_model_spec_writes_the_preset_and_only_what_differs() -> None:
    assert model_spec(get_preset("125m"), "125m") == {"preset": "125m"}
    assert model_spec(get_preset("1b").with_(max_seq_len=4096), "1b") == {
        "preset": "1b", "overrides": {"max_seq_len": 4096}}
    spec = model_spec(model_for_params(3e9))  # the nearest preset in parameter count, shape as overrides
    assert spec["preset"] == "7b" and set(spec["overrides"]) == {"dim", "n_layers", "n_heads", "ffn_dim"}
