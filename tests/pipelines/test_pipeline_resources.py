"""The run-config's `pipeline` section sets each kind of step's pod: CPU/memory requests and limits,
an accelerator, node selector and tolerations (compile-time: no parameter, no cache key changes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubellm.cli import main as cli_main

GPU_EVAL = ["--set", "pipeline.evaluate.accelerator_type=nvidia.com/gpu", "--set", "pipeline.evaluate.accelerator_limit=1",
            "--set", "pipeline.evaluate.cpu_request=4", "--set", "pipeline.evaluate.memory_limit=32Gi",
            "--set", 'pipeline.evaluate.node_selector={"node.kubernetes.io/instance-type": "g5.xlarge"}',
            "--set", 'pipeline.evaluate.tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]',
            "--set", "pipeline.data_prep.cpu_request=500m", "--set", "pipeline.data_prep.memory_request=2Gi"]


def _compile(out: Path, *flags: str) -> dict[str, list[dict[str, Any]]]:
    assert cli_main(["compile", "--preset", "debug", "--output", str(out), *flags]) == 0
    return {n: list(yaml.safe_load_all((out / f"{n}.yaml").read_text())) for n in ("llm_from_scratch",
                                                                                   "evaluation_report")}


def test_step_resources_reach_the_pods(tmp_path: Path) -> None:
    docs = _compile(tmp_path / "out", *GPU_EVAL, "--param", "data_prep_parallelism=4")
    for pipeline, step in (("llm_from_scratch", "exec-evaluate"), ("evaluation_report", "exec-evaluate-models")):
        spec, platform = docs[pipeline][0], docs[pipeline][1]["platforms"]["kubernetes"]["deploymentSpec"]
        res = spec["deploymentSpec"]["executors"][step]["container"]["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "1"
        assert res["resourceCpuRequest"] == "4" and res["resourceMemoryLimit"] == "32Gi"
        ex = platform["executors"][step]
        assert ex["nodeSelector"] == {"labels": {"node.kubernetes.io/instance-type": "g5.xlarge"}}
        assert ex["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    executors = docs["llm_from_scratch"][0]["deploymentSpec"]["executors"]
    for step in ("exec-list-shards", "exec-prepare-shard", "exec-dedup-reduce"):  # every data-prep pod
        res = executors[step]["container"]["resources"]
        assert res["resourceCpuRequest"] == "500m" and res["resourceMemoryRequest"] == "2Gi", step
        assert "accelerator" not in res
    assert "resources" not in executors["exec-tokenizer"]["container"]  # not set: the cluster's defaults


def test_resources_leave_parameters_and_cache_keys_alone(tmp_path: Path) -> None:
    plain = _compile(tmp_path / "a")
    sized = _compile(tmp_path / "b", *GPU_EVAL)
    for name in plain:
        assert plain[name][0]["root"]["inputDefinitions"] == sized[name][0]["root"]["inputDefinitions"]


@pytest.mark.parametrize("flag, message", [
    ("pipeline.evaluate.cpu_request=lots", "pipeline.evaluate.cpu_request: String should match pattern"),
    ("pipeline.pretrain.memory_limit=16GB", "pipeline.pretrain.memory_limit: String should match pattern"),
    ("pipeline.evaluate.accelerator_limit=1", "accelerator_type and accelerator_limit go together"),
    ("pipeline.evaluate.tolerations=[{\"effect\": \"Sometimes\"}]", "pipeline.evaluate.tolerations.0.effect"),
    ("pipeline.trainer.cpu_request=1", "pipeline.trainer"),
])
def test_bad_resources_are_refused_naming_the_field(flag: str, message: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["compile", "--preset", "debug", "--output", str(tmp_path / "o"), "--set", flag]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
