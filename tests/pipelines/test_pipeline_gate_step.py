"""The promotion gate is its own step after evaluate, so a failed gate still shows the report in the KFP
UI (KFP uploads no outputs of a failed task): evaluate always succeeds and publishes its verdict; the
gate step fails the run naming the failed rules, and is the one that moves the pointer (the
evaluation report's gate step never does). `kubellm run --local` ends the same way: exit 1 and the
gate's message, with the report written."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubellm.cli import main as cli_main
from kubellm.pipelines.definitions import PipelineSettings, build_pipelines
from kubellm.runconfig import load_run_config


def _compiled(tmp_path: Path, name: str) -> dict[str, Any]:
    from kfp import compiler

    path = tmp_path / f"{name}.yaml"
    compiler.Compiler().compile(build_pipelines(load_run_config(preset="debug"), PipelineSettings(tag="t"))[name],
                                str(path))
    return next(d for d in yaml.safe_load_all(path.read_text()) if d)


@pytest.mark.parametrize(("pipeline", "evaluate", "promote"), [("llm_from_scratch", "evaluate", True),
                                                               ("evaluation_report", "evaluate-models", False)])
def test_gate_step_after_evaluate(tmp_path: Path, pipeline: str, evaluate: str, promote: bool) -> None:
    spec = _compiled(tmp_path, pipeline)
    tasks = spec["root"]["dag"]["tasks"]
    gate = tasks["gate"]
    art = gate["inputs"]["artifacts"]["results"]["taskOutputArtifact"]
    assert art == {"outputArtifactKey": "results", "producerTask": evaluate}
    assert gate["inputs"]["parameters"]["promote"]["runtimeValue"]["constant"] is promote
    assert gate.get("cachingOptions", {}).get("enableCache", False) is False  # the pointer moves under one name
    image = spec["deploymentSpec"]["executors"]["exec-gate"]["container"]["image"]
    assert image.endswith("kubellm-base:t")  # no GPU pod for a pointer write
    src = spec["deploymentSpec"]["executors"][f"exec-{evaluate}"]["container"]["command"][-1]
    assert "defer_gate=True" in src  # evaluate publishes the verdict and succeeds


def test_local_report_with_a_failed_gate_fails_with_the_report_written(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "evaluate"))
    from evalkit import build_export, publish_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    art = str(tmp_path / "work" / "artifacts")
    model = publish_model(build_export(tmp_path / "hf", seed=0), art, "dpo")
    section = {"tasks": ["kubellm_knowledge"], "chat_tasks": [], "headline": {}, "limit": 1, "bootstrap_iters": 0, "device": "cpu",
               "dtype": "float32", "gate": {"promote": False, "rules": {"kubellm_knowledge": {"min": 1.5}}}}
    rc = cli_main(["run", "--local", "--preset", "debug", "--pipeline", "evaluation_report",
                   "--workdir", str(tmp_path / "work"), "--models", model.uri,
                   "--param", f"evaluate_config={json.dumps(section)}"])
    out = capsys.readouterr().out
    summary = out.rpartition("=" * 72)[2]
    assert rc == 1 and "FAILED" in summary, out[-3000:]
    assert ("[kubellm] gate failed: GateFailedError: promotion gate FAILED for dpo: kubellm_knowledge acc "
            in summary), summary
    assert "must be ≥ 1.5000" in summary and "Inner task failed: 'gate'" in summary
    # the score table a passing run prints, before the gate's error (was: left out on a failed gate)
    assert "## Gate (dpo): FAILED" in summary and "| kubellm_knowledge" in summary, summary
    assert "[kubellm] report (Markdown):" in summary
    # the evaluate step succeeded and wrote its outputs: what the KFP UI shows
    [run] = (tmp_path / "work" / "kfp").glob("evaluation-report-*")
    assert "## Gate (dpo): FAILED" in (run / "evaluate-models" / "report").read_text()
    assert "FAILED" in (run / "evaluate-models" / "report_html").read_text()
    assert not (Path(art) / "registry").exists()
