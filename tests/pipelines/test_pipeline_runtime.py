"""`kubellm.pipelines.runtime`: what a KFP component does around its stage — the config section
checked naming the field, the stage's own error (every line) in the log, and no main output artifact
a downstream step could read as valid unless the whole component succeeded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubellm.core.errors import ConfigError, InputDataError
from kubellm.core.manifest import FileEntry, Manifest, load_manifest_ref
from kubellm.pipelines import runtime


class _Artifact:
    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.metadata: dict[str, Any] = {}
        self.metrics: dict[str, float] = {}

    def log_metric(self, k: str, v: float) -> None:
        self.metrics[k] = v


def _outputs(tmp_path: Path, *names: str) -> dict[str, _Artifact]:
    return {n: _Artifact(tmp_path / "kfp" / n) for n in ("manifest", *names)}


def test_bad_section_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outs = _outputs(tmp_path, "metrics", "report")
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size"):
        runtime.run_component("tokenizer", '{"vocab_size": "many"}', str(tmp_path / "art"),
                              {"dataset": "x"}, outs)
    err = capsys.readouterr().err
    assert "[kubellm] tokenizer failed: ConfigError: pipeline parameter tokenizer_config" in err
    assert "[kubellm]   - tokenizer.vocab_size" in err  # every line of the message, not just the first
    assert not any(Path(a.path).exists() for a in outs.values())
    with pytest.raises(ConfigError, match="storage_root is empty"):
        runtime.run_component("tokenizer", "{}", "", {"dataset": "x"}, outs)
    with pytest.raises(ConfigError, match="tokenizer_config: not valid JSON/YAML"):
        runtime.parse_section("tokenizer", "{bad")


def test_stage_error_reported_and_nothing_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    def boom(*_: Any) -> Manifest:
        raise InputDataError("a.jsonl:line 2: malformed_json\nFix the inputs")

    monkeypatch.setattr("kubellm.stages.run_stage", boom)
    outs = _outputs(tmp_path, "metrics", "report")
    with pytest.raises(InputDataError):
        runtime.run_component("tokenizer", "{}", str(tmp_path / "art"), {"dataset": "x"}, outs)
    err = capsys.readouterr().err
    assert "[kubellm] tokenizer failed: InputDataError: a.jsonl:line 2: malformed_json" in err
    assert "[kubellm]   Fix the inputs" in err
    assert not any(Path(a.path).exists() for a in outs.values())

    def unexpected(*_: Any) -> Manifest:
        raise PermissionError(13, "Permission denied", "/data/x")

    monkeypatch.setattr("kubellm.stages.run_stage", unexpected)
    with pytest.raises(PermissionError):
        runtime.run_component("tokenizer", "{}", str(tmp_path / "art"), {"dataset": "x"}, outs)
    assert "[kubellm] tokenizer failed: PermissionError: [Errno 13] Permission denied: '/data/x'" in \
        capsys.readouterr().err


def test_main_artifact_written_last(tmp_path: Path) -> None:
    # the manifest lists an HTML report that cannot be fetched: the component fails, and its main
    # output artifact must not hold a manifest (it used to be written first)
    m = Manifest(kind="eval", uri=str(tmp_path / "gone"), files=[FileEntry(path="report.html", size=3,
                                                                          sha256="0" * 64)])
    outs = _outputs(tmp_path, "metrics", "report", "html")
    with pytest.raises(Exception):  # noqa: B017 - whatever fetch raises
        runtime.write_outputs("evaluate", m, outs)
    assert not Path(outs["manifest"].path).exists() and outs["manifest"].metadata == {}
    assert not list((tmp_path / "kfp").glob(".manifest*"))
    ok = Manifest(kind="eval", uri=str(tmp_path / "art"), counts={"n": 2})
    runtime.write_outputs("evaluate", ok, outs)
    assert load_manifest_ref(outs["manifest"].path).digest() == ok.digest()
    assert outs["manifest"].metadata["digest"] == ok.digest() and outs["metrics"].metrics == {"n": 2.0}
    assert sorted(p.name for p in (tmp_path / "kfp").iterdir()) == ["html", "manifest", "report"]  # metrics: logged
