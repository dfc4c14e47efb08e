"""Source parameters are strings: a JSON list given with --param is refused, not compiled as its
Python repr ("['s3://a/x', 's3://b/y']" would be read as one odd path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubellm.cli import main as cli_main


@pytest.mark.parametrize("param", ["raw_source", "chat_source", "preferences_source"])
def test_a_json_list_source_is_refused_naming_the_string_form(param: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["compile", "--preset", "debug", "--output", str(tmp_path / "out"),
                   "--param", f'{param}=["s3://a/x","s3://b/y"]'])
    err = capsys.readouterr().err
    assert rc == 1 and f'--param {param}=["s3://a/x", "s3://b/y"]: expected a string, not JSON' in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, param", [
    (["--set", "pretrain.launch.cluster.s3_endpoint_url=http://minioadmin:minio123@minio.minio:9000"],
     "pretrain_config"),
    (["--set", "storage.root=https://user:minio123@host/x"], "storage_root"),
    (["--param", "raw_source=s3://AKIAEXAMPLE:minio123@bucket/raw/"], "raw_source"),
])
def test_a_url_with_a_password_never_reaches_the_pipeline_yaml(flags: list[str], param: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Parameter defaults are stored in the YAML and shown in the KFP UI: refused, password not echoed."""
    rc = cli_main(["compile", "--preset", "debug", "--output", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert rc == 1 and f"pipeline parameter {param}: a URL carries credentials" in err, err
    assert "minio123" not in err and "***@" in err
    assert not (tmp_path / "out").exists()


def _tasks(path: Path) -> dict:
    import yaml

    spec = next(yaml.safe_load_all(path.read_text()))
    out = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():  # tasks inside a ParallelFor live in its sub-DAG
        out.update(comp.get("dag", {}).get("tasks", {}))
    return out


@pytest.mark.parametrize("flags, expected", [([], 2), (["--retries", "5"], 5), (["--retries", "0"], None)])
def test_every_step_retries_with_backoff(flags: list[str], expected: int | None, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli_main(["compile", "--preset", "debug", "--output", str(out), "--param", "data_prep_parallelism=4",
                     *flags]) == 0
    for pipeline in ("llm_from_scratch", "evaluation_report"):
        tasks = _tasks(out / f"{pipeline}.yaml")
        for name, task in tasks.items():
            if "componentRef" not in task or name.startswith("for-loop"):
                continue
            policy = task.get("retryPolicy")
            if expected is None:
                assert policy is None, name
            else:
                assert policy == {"maxRetryCount": expected, "backoffDuration": "30s", "backoffFactor": 2.0,
                                  "backoffMaxDuration": "3600s"}, name
        assert expected is None or "prepare-shard" in tasks or pipeline == "evaluation_report"


def test_retries_out_of_range_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["compile", "--preset", "debug", "--output", str(tmp_path / "o"), "--retries", "-1"]) == 1
    assert "--retries -1: must be a whole number from 0 to 10" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["submit", "--preset", "debug", "--set", "sources.raw=s3://b/raw/", "--set", "sources.chat=s3://b/c.jsonl",
      "--set", "sources.preferences=s3://b/p.jsonl"], "storage_root='.kubellm/artifacts'"),
    (["submit", "--preset", "debug", "--set", "storage.root=s3://b/k", "--set", "sources.raw=./corpus",
      "--set", "sources.chat=s3://b/c.jsonl", "--set", "sources.preferences=s3://b/p.jsonl"], "raw_source='./corpus'"),
    (["schedule", "--preset", "debug", "--set", "storage.root=s3://b/k", "--name", "weekly", "--cron", "0 0 3 * * 1",
      "--models", "s3://b/k/sft/ab,/home/me/model"], "model_uris='/home/me/model'"),
])
def test_a_cluster_run_with_a_local_path_is_refused_before_reaching_kfp(argv: list[str], named: str,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Every step runs in its own pod: a path on this machine is shared by none of them."""
    rc = cli_main([argv[0], "--endpoint", "http://127.0.0.1:9", *argv[1:]])  # nothing listens: not contacted
    err = capsys.readouterr().err
    assert rc == 1 and named in err and "on Kubeflow every step runs in its own pod" in err, err
