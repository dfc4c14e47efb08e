"""`kubellm run --local` arguments without running a pipeline: the demo world follows --demo-scale, an
S3 copy follows the local world, missing sources fall back per source, --param storage_root moves
the promoted pointer too."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kubellm.cli import main as cli_main
from kubellm.core.storage import storage_for
from kubellm.pipelines import local_run
from kubellm.runconfig import load_run_config


def _args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = dict(pipeline="llm_from_scratch", raw=None, chat=None, preferences=None,
                                   demo_scale=1.0, param=[], models=[])
    return argparse.Namespace(**{**base, **kw})


def _corpus_bytes(p: str) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


def test_demo_world_regenerated_when_the_scale_changes(tmp_path: Path) -> None:
    small = local_run._demo_world(tmp_path, str(tmp_path / "art"), 0.01)
    n_small = _corpus_bytes(small["raw"])
    bigger = local_run._demo_world(tmp_path, str(tmp_path / "art"), 0.05)
    assert _corpus_bytes(bigger["raw"]) > n_small  # was: the 0.01 world kept
    world = tmp_path / "demo-world" / "world.json"
    mtime = world.stat().st_mtime_ns
    local_run._demo_world(tmp_path, str(tmp_path / "art"), 0.05)
    assert world.stat().st_mtime_ns == mtime  # same seed and scale: reused


def test_sync_up_replaces_changed_and_removes_stale_objects(s3_bucket: str, tmp_path: Path) -> None:
    local = tmp_path / "w"
    (local / "corpus").mkdir(parents=True)
    (local / "corpus" / "part-0.jsonl").write_text('{"text": "new"}\n')
    (local / "world.json").write_text("{}")
    dest = f"{s3_bucket}/demo-world"
    st = storage_for(dest)
    st.write_bytes(f"{dest}/corpus/part-0.jsonl", b'{"text": "old"}\n')  # same size, other content
    st.write_bytes(f"{dest}/corpus/part-1.jsonl", b"from a bigger scale")
    local_run._sync_up(local, dest)
    assert st.read_bytes(f"{dest}/corpus/part-0.jsonl") == b'{"text": "new"}\n'  # was: kept (key existed)
    assert sorted(o.relpath for o in st.list(dest)) == ["corpus/part-0.jsonl", "world.json"]


def test_sync_up_leaves_an_unchanged_multipart_object_alone(s3_bucket: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A file past the multipart threshold has an ETag `<md5 of part md5s>-<n>`, never its MD5: it was
    uploaded again on every run."""
    from kubellm.core.storage import MiB, reset_clients

    monkeypatch.setenv("KUBELLM_S3_MULTIPART_THRESHOLD", str(5 * MiB))
    monkeypatch.setenv("KUBELLM_S3_MULTIPART_CHUNKSIZE", str(5 * MiB))
    reset_clients()
    local = tmp_path / "w"
    local.mkdir()
    (local / "big.bin").write_bytes(bytes(range(256)) * (48 * 1024))  # 12 MiB: 3 parts
    dest = f"{s3_bucket}/demo-world"
    local_run._sync_up(local, dest)
    (obj,) = storage_for(dest).list(dest)
    assert obj.etag.endswith("-3")
    uploads: list[str] = []
    st = storage_for(dest)
    real = type(st).upload
    monkeypatch.setattr(type(st), "upload", lambda self, p, uri: uploads.append(uri) or real(self, p, uri))
    local_run._sync_up(local, dest)
    assert uploads == []
    (local / "big.bin").write_bytes(bytes(range(255, -1, -1)) * (48 * 1024))  # same size, other bytes
    local_run._sync_up(local, dest)
    assert uploads == [f"{dest}/big.bin"]


def test_raw_alone_takes_chat_and_preferences_from_the_demo_world(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    demo = {"raw": "/demo/corpus", "chat": "/demo/chat.jsonl", "preferences": "/demo/prefs.jsonl"}
    monkeypatch.setattr(local_run, "_demo_world", lambda workdir, root, scale: dict(demo))
    got = local_run.pipeline_arguments(_args(raw="/mine", preferences="/mine-prefs"), str(tmp_path / "art"),
                                       tmp_path, load_run_config(preset="debug"))
    assert (got["raw_source"], got["chat_source"], got["preferences_source"]) == (
        "/mine", "/demo/chat.jsonl", "/mine-prefs")  # was: chat_source "" (failing later, naming nothing)


def test_param_storage_root_moves_the_promoted_pointer(tmp_path: Path) -> None:
    got = local_run.pipeline_arguments(
        _args(raw="/r", chat="/c", preferences="/p", param=[f"storage_root={tmp_path / 'elsewhere'}"]),
        str(tmp_path / "art"), tmp_path, load_run_config(preset="debug"))
    assert got["storage_root"] == str(tmp_path / "elsewhere")
    assert got["promoted_pointer"] == f"{tmp_path / 'elsewhere'}/registry/kubellm/promoted.json"  # was: under art/


def test_param_storage_root_with_bucket_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["run", "--local", "--preset", "debug", "--workdir", str(tmp_path / "work"), "--bucket", "b",
                   "--param", "storage_root=s3://other/x"])
    assert rc == 1 and "--param storage_root and --bucket" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_sources_given_by_param_build_no_demo_world_and_a_flag_and_param_conflict(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubellm.core.errors import ConfigError

    monkeypatch.setattr(local_run, "_demo_world", lambda *a: pytest.fail("built the demo world for --param sources"))
    params = ["raw_source=/p/raw", "chat_source=/p/chat.jsonl", "preferences_source=/p/prefs.jsonl"]
    got = local_run.pipeline_arguments(_args(param=params), str(tmp_path / "art"), tmp_path,
                                       load_run_config(preset="debug"))
    assert (got["raw_source"], got["chat_source"], got["preferences_source"]) == (
        "/p/raw", "/p/chat.jsonl", "/p/prefs.jsonl")
    with pytest.raises(ConfigError, match=r"--raw and --param raw_source both name the raw source: give one"):
        local_run.pipeline_arguments(_args(raw="/mine", param=params), str(tmp_path / "art"), tmp_path,
                                     load_run_config(preset="debug"))
