"""Layout / ZeRO / precision / device combinations the workers would refuse at start-up are refused by
the stage's `run()` first: no process launched, nothing written (unit tier, no training).

    .venv/bin/python -m pytest tests/training/test_prelaunch_checks.py -q

Every launcher (and the in-process worker) is replaced by one that fails the test if it is reached.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kubellm.core.config import validate
from kubellm.core.errors import ConfigError
from kubellm.model import get_preset

DEBUG = get_preset("debug").with_(vocab_size=256)
"""The shape every test model has: n_heads=4, n_kv_heads=2, n_layers=2."""

# (overrides of the stage section, what the refusal must say); each one a worker refuses today
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "tp does not divide n_kv_heads": (
        {"parallel": {"tp": 4}, "launch": {"nproc_per_node": 4}},
        r"parallel.tp=4 does not divide the model's n_kv_heads=2"),
    "more pipeline stages than layers": (
        {"parallel": {"pp": DEBUG.n_layers + 1}, "launch": {"nproc_per_node": DEBUG.n_layers + 1}},
        rf"parallel.pp={DEBUG.n_layers + 1} is larger than the model's n_layers={DEBUG.n_layers}"),
    "zero 2 with pp": (
        {"parallel": {"pp": 2}, "launch": {"nproc_per_node": 2}, "train": {"zero_stage": 2}},
        r"train.zero_stage=2 with parallel.pp=2"),
    "zero 3 with pp": (
        {"parallel": {"pp": 2}, "launch": {"nproc_per_node": 2}, "train": {"zero_stage": 3}},
        r"train.zero_stage=3 with parallel.pp=2"),
    "optimizer offload with pp": (
        {"parallel": {"pp": 2}, "launch": {"nproc_per_node": 2},
         "train": {"zero_stage": 1, "offload_optimizer": True}},
        r"train.offload_optimizer with parallel.pp > 1"),
    "param offload without zero 3": (
        {"launch": {"nproc_per_node": 2}, "train": {"zero_stage": 1, "offload_params": True}},
        r"train.offload_params needs train.zero_stage=3 \(got 1\)"),
    "optimizer offload without zero": (
        {"launch": {"nproc_per_node": 2}, "train": {"offload_optimizer": True}},
        r"train.offload_optimizer needs train.zero_stage ≥ 1 \(got 0\)"),
    "compile with tp": (
        {"parallel": {"tp": 2}, "launch": {"nproc_per_node": 2}, "train": {"compile": True}},
        r"train.compile is supported for dense models only; got parallel.tp=2"),
    "fp16 on cpu": (
        {"launch": {"nproc_per_node": 2}, "train": {"precision": "fp16", "device": "cpu"}},
        r"train.precision=fp16 needs CUDA"),
    "gpus requested for a cpu run": (
        {"launch": {"backend": "pytorchjob", "nproc_per_node": 2, "gpu": 2}, "train": {"device": "cpu"}},
        r"launch.gpu=2 with train.device=cpu"),
    "cuda without gpus on the cluster": (
        {"launch": {"backend": "pytorchjob", "nproc_per_node": 2}, "train": {"device": "cuda"}},
        r"train.device=cuda with launch.gpu=0"),
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _section(stage: str, over: dict[str, Any]) -> Any:
    from kubellm.dpo.config import DPOConfig
    from kubellm.pretrain.config import PretrainConfig
    from kubellm.sft.config import SFTConfig

    base: dict[str, Any] = {"train": {"max_steps": 2, "micro_batch_size": 2, "global_batch_size": 8, "seq_len": 32},
                            "launch": {"cluster": {"s3_secret_name": "s3"}}}
    if stage == "pretrain":
        base["model"] = {"preset": "debug", "overrides": {"vocab_size": 256}}
    model = {"pretrain": PretrainConfig, "sft": SFTConfig, "dpo": DPOConfig}[stage]
    return validate(model, _merge(base, over), "run.yaml", stage)


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any launch (local torchrun/TorchX, PyTorchJob, or training in this process) fails the test."""
    import kubellm.dpo.stage as dpo
    import kubellm.pretrain.stage as pretrain
    import kubellm.sft.stage as sft
    import kubellm.training.job as job
    import kubellm.training.launch_local as local
    import kubellm.training.model_stage as model_stage
    import kubellm.training.pytorchjob as pj

    def launched(*_: Any, **__: Any) -> None:
        pytest.fail("a training process was launched for a configuration the launcher should refuse")

    for mod, name in [(job, "launch_job"), (pretrain, "launch_job"), (model_stage, "launch_job"),
                      (local, "launch_local"), (pj, "run_appdef"), (pretrain, "run_worker"),
                      (sft, "run_worker"), (dpo, "run_worker")]:
        monkeypatch.setattr(mod, name, launched)
    for k in ("RANK", "WORLD_SIZE", "KUBELLM_RUN_ID", "KUBELLM_KFP_RUN_ID"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, str]:
    """A tokens artifact (pretrain), a local HF model directory and chat / preference files (SFT, DPO)."""
    from kubellm.core.manifest import publish_dir
    from kubellm.model.hf import hf_config_dict
    from kubellm.tokenizer.shards import TokenShardWriter

    src = tmp_path / "tok_src"
    with TokenShardWriter(src / "train/part-00000.tok", 256) as w:
        for i in range(20):
            w.add_document([1, *((np.arange(30) * 3 + i) % 250 + 3), 2])
    tokens = publish_dir(src, str(tmp_path / "store/tokenizer/abc"), kind="token_shards",
                         metadata={"vocab_size": 256, "bos_id": 1, "eos_id": 2, "pad_id": 0}).uri
    model = tmp_path / "base_model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(hf_config_dict(DEBUG)))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go away"}) + "\n")
    return {"tokens": tokens, "model": str(model), "chat": str(chat), "preferences": str(prefs)}


def _run(stage: str, config: Any, inputs: dict[str, str], output: Path) -> Any:
    import importlib

    wanted = {"pretrain": ["tokens"], "sft": ["model", "chat"], "dpo": ["model", "preferences"]}[stage]
    run = importlib.import_module(f"kubellm.{stage}.stage").run
    return run(config, {k: inputs[k] for k in wanted}, str(output))


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_combination_refused_before_launch(stage: str, case: str, inputs: dict[str, str], tmp_path: Path,
                                           no_launch: None) -> None:
    over, message = REFUSED[case]
    config = _section(stage, over)  # loads fine: the refusal is about the job, not one field
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message) as err:
        _run(stage, config, inputs, out)
    assert str(err.value).startswith(f"{stage}: ")  # which section of the run config
    assert not out.exists()  # no run dir, no job.json, no artifact


def test_a_workable_layout_still_reaches_the_launcher(inputs: dict[str, str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import kubellm.pretrain.stage as pretrain
    import kubellm.training.model_stage as model_stage

    class Launched(Exception):
        pass

    def launched(*_: Any, **__: Any) -> None:
        raise Launched

    monkeypatch.setattr(pretrain, "launch_job", launched)
    monkeypatch.setattr(model_stage, "launch_job", launched)
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    ok = {"parallel": {"tp": 2}, "launch": {"backend": "pytorchjob", "nproc_per_node": 2, "gpu": 2},
          "train": {"precision": "fp16"}}  # device auto: the pods have GPUs
    for stage in ("pretrain", "sft", "dpo"):
        with pytest.raises(Launched):
            _run(stage, _section(stage, ok), inputs, tmp_path / "out")



@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_model_artifact_is_not_fetched_before_the_checks(stage: str, inputs: dict[str, str], tmp_path: Path,
                                                           no_launch: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run()` reads the input model's shape and digest only; its weights are the workers' to fetch."""
    import kubellm.training.data as data
    from kubellm.core.manifest import publish_dir

    model = publish_dir(Path(inputs["model"]).parent / "base_model", str(tmp_path / "store/pretrain/m"),
                        kind="model", metadata={"export_path": "", "model_config": DEBUG.model_dump(mode="json")})
    fetched: list[bool] = []
    real = data.stage_artifact_files
    monkeypatch.setattr(data, "stage_artifact_files", lambda *a, **k: (fetched.append(k.get("fetch_here", True)),
                                                                        real(*a, **k))[1])
    over, message = REFUSED["tp does not divide n_kv_heads"]
    with pytest.raises(ConfigError, match=message):
        _run(stage, _section(stage, over), {**inputs, "model": model.uri}, tmp_path / "out")
    assert fetched and not any(fetched)


def test_dpo_with_pipeline_parallelism_is_refused_before_launch(inputs: dict[str, str], tmp_path: Path,
                                                                no_launch: None) -> None:
    """The pipeline schedule runs causal-LM losses only: DPO with pp > 1 was refused by every worker
    after start-up; the stage refuses it now (pretrain and SFT with the same layout are workable)."""
    pp2 = {"parallel": {"pp": 2}, "launch": {"nproc_per_node": 2}}
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"^dpo: parallel.pp > 1 is not supported for dpo: .*Use parallel.pp=1"):
        _run("dpo", _section("dpo", pp2), inputs, out)
    assert not out.exists()


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
@pytest.mark.parametrize("device, message", [("auto", r"launch.gpu=1, but this machine has no CUDA device"),
                                             ("cuda", r"train.device=cuda but no CUDA device is visible")])
def test_gpus_requested_from_the_local_launcher_on_a_machine_without_cuda(
        stage: str, device: str, message: str, inputs: dict[str, str], tmp_path: Path, no_launch: None) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the local workers would use the GPU")
    out = tmp_path / "out"
    config = _section(stage, {"launch": {"nproc_per_node": 2, "gpu": 1}, "train": {"device": device}})
    with pytest.raises(ConfigError, match=rf"^{stage}: {message}"):
        _run(stage, config, inputs, out)
    assert not out.exists()
