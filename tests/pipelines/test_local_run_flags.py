"""`kubellm run --local` flags refused up front (naming the flag, nothing written), without running
a pipeline (the end-to-end runs are in test_local_run_e2e.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from kubellm.cli import main as cli_main
from kubellm.pipelines.definitions import section_json
from kubellm.pipelines.local_run import pipeline_arguments
from kubellm.runconfig import load_run_config


def _run(tmp_path: Path, *extra: str) -> int:
    return cli_main(["run", "--local", "--preset", "debug", "--until", "data_prep",
                     "--workdir", str(tmp_path / "work"), *extra])


@pytest.mark.parametrize(("extra", "message"), [
    (["--param", "nosuch=1"], "--param nosuch: not a parameter of llm_from_scratch"),
    (["--param", "model_uris=x"], "--param model_uris: not a parameter of llm_from_scratch"),
    (["--param", 'data_prep_config={"bogus": 1}'], "data_prep.bogus: unknown key"),
    (["--param", "tokenizer_config=[1"], "--param tokenizer_config: value looks like JSON but does not parse"),
    (["--param", "tokenizer_config=vocab_size: [1"], "--param tokenizer_config: not valid JSON/YAML"),
    (["--param", 'raw_source={"a": 1}'], "--param raw_source="),
    (["--demo-scale", "-1"], "--demo-scale"),
    (["--s3-endpoint", "http://127.0.0.1:1"], "--s3-endpoint needs --bucket"),
    # it had named KUBELLM_S3_ENDPOINT_URL, a variable the user never set, after making the workdir
    (["--s3-endpoint", "127.0.0.1:9000", "--bucket", "b"],
     "--s3-endpoint '127.0.0.1:9000': expected an http:// or https:// URL with a host"),
    (["--models", "s3://b/m"], "--models: only for --pipeline evaluation_report"),
])
def test_bad_flag_refused_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     extra: list[str], message: str) -> None:
    assert _run(tmp_path, *extra) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("sub", ["", "sub"])
def test_workdir_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], sub: str) -> None:
    f = tmp_path / "f"
    f.write_text("mine")
    workdir = f / sub if sub else f
    assert cli_main(["run", "--local", "--preset", "debug", "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err
    assert "--workdir" in err and "is not a directory" in err and "Traceback" not in err
    assert f.read_text() == "mine"


def test_config_param_given_as_json_object_reaches_the_component_as_a_string(tmp_path: Path) -> None:
    cfg = load_run_config(preset="debug")
    args = argparse.Namespace(pipeline="llm_from_scratch", raw="/data/raw", chat="/data/chat",
                              preferences="/data/prefs", demo_scale=1.0,
                              param=['tokenizer_config={"vocab_size": 4096}'])
    got = pipeline_arguments(args, str(tmp_path / "art"), tmp_path / "work", cfg)
    # a string, the run-config's tokenizer section with vocab_size replaced (merged, not reset)
    want = {**json.loads(section_json(cfg, "tokenizer")), "vocab_size": 4096}
    assert json.loads(got["tokenizer_config"]) == want and got["raw_source"] == "/data/raw"
    # model.overrides merges key by key; gate.rules (task -> rule) is replaced whole
    args.param = ['pretrain_config={"model": {"overrides": {"n_layers": 6}}}',
                  'evaluate_config={"gate": {"rules": {"kubellm_knowledge": {"max_drop": 0.01}}}}']
    got = pipeline_arguments(args, str(tmp_path / "art"), tmp_path / "work", cfg)
    assert json.loads(got["pretrain_config"])["model"]["overrides"] == {**cfg.pretrain.model.overrides, "n_layers": 6}
    assert json.loads(got["evaluate_config"])["gate"]["rules"] == {"kubellm_knowledge": {"max_drop": 0.01}}
    assert len(cfg.evaluate.gate.rules) == 3  # the preset's other two rules are dropped
    args = argparse.Namespace(pipeline="evaluation_report", models=[], demo_scale=1.0,
                              param=['model_uris=["s3://b/x"]'])
    assert pipeline_arguments(args, str(tmp_path / "art"), tmp_path / "work", cfg)["model_uris"] == ["s3://b/x"]
    assert not (tmp_path / "work").exists()


def test_failed_step_error_in_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a missing --raw fails the uncached fingerprint step: the summary says why, not just which task
    missing = tmp_path / "no-such-corpus"
    assert _run(tmp_path, "--raw", str(missing), "--chat", str(tmp_path / "c.jsonl"),
                "--preferences", str(tmp_path / "p.jsonl")) == 1
    summary = capsys.readouterr().out.rpartition("=" * 72)[2]
    assert "FAILED" in summary
    assert (f"[kubellm] fingerprint failed: InputDataError: raw_source: {missing}: no such file, directory or "
            "glob match") in summary
    assert "Inner task failed: 'fingerprint-source'" in summary


def test_llm_from_scratch_flags_refused_for_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --until/--raw used to be ignored silently: the whole evaluation report ran
    assert cli_main(["run", "--local", "--preset", "debug", "--pipeline", "evaluation_report", "--until", "tokenizer",
                     "--raw", "/data/raw", "--workdir", str(tmp_path / "work")]) == 1
    assert "--until, --raw: only for --pipeline llm_from_scratch" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
