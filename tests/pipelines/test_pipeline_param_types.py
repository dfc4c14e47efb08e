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
