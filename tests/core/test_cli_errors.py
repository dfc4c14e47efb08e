"""How the `kubellm` command ends when something outside kubellm's own checks goes wrong: one line on
stderr and a shell-style exit code, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubellm.cli import main as cli_main


def test_a_stage_output_that_is_a_file_is_refused_before_the_stage_runs(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # the stage had run, then failed with a NotADirectoryError traceback (a training stage after its
    # workers started)
    not_a_dir = tmp_path / "rc.yaml"
    not_a_dir.write_text("name: x\n")
    assert cli_main(["data-prep", "--preset", "debug", "--input", f"raw={tmp_path}/nothing",
                     "--output", str(not_a_dir)]) == 1
    err = capsys.readouterr().err
    assert f"--output {str(not_a_dir)!r}: {str(not_a_dir)!r} exists and is not a directory" in err
    assert "Traceback" not in err and not (tmp_path / "rc.yaml" / "data_prep").exists()


@pytest.mark.parametrize(("raised", "code", "said"), [
    (KeyboardInterrupt(), 130, "kubellm plan: interrupted"),
    (PermissionError(13, "Permission denied", "/mnt/ro/plan.yaml"),
     1, "kubellm plan: error: [Errno 13] Permission denied: '/mnt/ro/plan.yaml'"),
])
def test_ctrl_c_and_os_errors_end_in_one_line(raised: BaseException, code: int, said: str,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import kubellm.training.planner as planner

    def boom(args: object) -> int:
        raise raised

    monkeypatch.setattr(planner, "main", boom)
    assert cli_main(["plan", "--model", "125m", "--gpus", "8"]) == code
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


def test_a_bad_set_value_is_not_blamed_on_the_file(tmp_path: Path) -> None:
    from kubellm.core.errors import ConfigError
    from kubellm.runconfig import load_run_config

    rc = tmp_path / "rc.yaml"
    rc.write_text("name: x\n")
    with pytest.raises(ConfigError, match=r"rc\.yaml \+ --set pretrain\.train\.max_steps: invalid configuration"):
        load_run_config(rc, overrides=["pretrain.train.max_steps=abc"])
