"""`--param`/`--arg` values and the cluster-path check: empty values, labelled models, credentials in
run arguments, redaction, S3 globs, partial `<stage>_config` objects merged over the run-config."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubellm.core.errors import ConfigError
from kubellm.pipelines.common import check_cluster_paths, parse_params
from kubellm.pipelines.definitions import PipelineSettings, check_arguments, parameter_defaults, section_json
from kubellm.runconfig import load_run_config


def _report_defaults() -> dict[str, Any]:
    return parameter_defaults(load_run_config(preset="debug", overrides=["storage.root=s3://b/kubellm"]),
                              PipelineSettings())["evaluation_report"]


def test_empty_value_is_an_empty_string_and_errors_name_the_flag() -> None:
    assert parse_params(["tokens="]) == {"tokens": ""}  # was: "looks like JSON but does not parse"
    with pytest.raises(ConfigError, match=r"^--arg 'tokens': expected NAME=VALUE"):
        parse_params(["tokens"], "--arg")
    with pytest.raises(ConfigError, match="^--arg model_uris: value looks like JSON"):
        parse_params(["model_uris=[1"], "--arg")


def test_labelled_s3_model_passes_the_cluster_check_a_labelled_local_one_does_not() -> None:
    d = _report_defaults()
    check_cluster_paths("evaluation_report", {"model_uris": ["sft:s3://b/sft/ab"]}, d)  # was: "a local path"
    with pytest.raises(ConfigError, match=r"model_uris='/tmp/m' is a local path"):
        check_cluster_paths("evaluation_report", {"model_uris": ["sft:/tmp/m"]}, d)


def test_cluster_check_redacts_and_names_urls_that_are_not_s3() -> None:
    d = _report_defaults()
    with pytest.raises(ConfigError) as e:
        check_cluster_paths("evaluation_report", {"tokens": "https://user:hunter2@host/tokens"}, d)
    msg = str(e.value)
    assert "hunter2" not in msg and "***@host/tokens" in msg
    assert "is a URL" in msg and "only s3:// is supported" in msg and "local path" not in msg


def test_s3_glob_source_refused_by_the_cluster_check() -> None:
    d = parameter_defaults(load_run_config(preset="debug", overrides=["storage.root=s3://b/kubellm"]),
                           PipelineSettings())["llm_from_scratch"]
    with pytest.raises(ConfigError, match="glob patterns are not supported on s3://"):
        check_cluster_paths("llm_from_scratch", {"raw_source": "s3://b/raw/*.jsonl", "chat_source": "s3://b/c",
                                                 "preferences_source": "s3://b/p"}, d)
    check_cluster_paths("llm_from_scratch", {"raw_source": "hf:wikitext:wikitext-2-raw-v1,s3://b/raw/",
                                             "chat_source": "s3://b/c", "preferences_source": "s3://b/p"}, d)


@pytest.mark.parametrize("name, value", [("storage_root", "s3://AKIAEXAMPLE:hunter2@b/kubellm"),
                                         ("evaluate_config", {"eval_dir": "https://u:hunter2@host/x"}),
                                         ("evaluate_config", {"eval_dir": "https://hunter2@host/x"})])  # a token alone
def test_credentials_in_a_run_argument_are_refused(name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as e:  # was: only compile-time defaults were checked
        check_arguments("evaluation_report", {name: value}, _report_defaults(), "--arg")
    msg = str(e.value)
    assert msg.startswith(f"--arg {name}: a URL carries credentials") and "hunter2" not in msg


def test_submit_refuses_credentials_in_arg_before_contacting_kfp(capsys: pytest.CaptureFixture[str]) -> None:
    from kubellm.cli import main as cli_main

    rc = cli_main(["submit", "--endpoint", "http://127.0.0.1:9", "--preset", "debug",
                   "--set", "storage.root=s3://b/kubellm", "--set", "sources.raw=s3://b/raw/",
                   "--set", "sources.chat=s3://b/c.jsonl", "--set", "sources.preferences=s3://b/p.jsonl",
                   "--arg", "raw_source=s3://AKIAEXAMPLE:hunter2@b/raw/"])
    err = capsys.readouterr().err
    assert rc == 1 and "--arg raw_source: a URL carries credentials" in err and "hunter2" not in err, err


def test_partial_stage_config_is_merged_over_the_run_config_section() -> None:
    cfg = load_run_config(preset="debug", overrides=["dpo.label_smoothing=0.1", "dpo.train.max_steps=7"])
    want = {**json.loads(section_json(cfg, "dpo")), "beta": 0.2}
    d = parameter_defaults(cfg, PipelineSettings(params=(("dpo_config", {"beta": 0.2}),)))["llm_from_scratch"]
    assert json.loads(d["dpo_config"]) == want  # was: every other field reset to the schema's defaults
    # a nested section merges key by key too; --arg merges over the compiled default
    got = check_arguments("llm_from_scratch", {"dpo_config": '{"train": {"optim": {"lr": 0.001}}}'}, d, "--arg")
    merged = json.loads(got["dpo_config"])
    assert merged["train"]["optim"]["lr"] == 0.001 and merged["train"]["max_steps"] == 7
    assert merged["beta"] == 0.2 and merged["label_smoothing"] == 0.1
