"""The fingerprint covers exactly what the stages read (`scan_sources`: globs with `**` matching zero
directories, hub datasets, plain HF model directories), and refuses what no stage can read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kubellm.core.errors import ConfigError, InputDataError
from kubellm.core.storage import storage_for
from kubellm.data_prep.sources import scan_sources
from kubellm.pipelines.fingerprint import default_pointer, fingerprint, fingerprint_models, resolve_promoted


def test_double_star_glob_fingerprints_top_level_files_data_prep_reads(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "a"}\n')
    src = "data/**/*.jsonl"
    assert [s.uri for s in scan_sources(src).sources] == ["data/a.jsonl"]  # what data prep reads
    fp1 = fingerprint(src)  # was: "matched no objects" (fnmatch's `**/` needs a directory)
    (tmp_path / "data" / "sub").mkdir()
    (tmp_path / "data" / "sub" / "b.jsonl").write_text('{"text": "b"}\n')
    fp2 = fingerprint(src)
    assert fp2 != fp1
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "changed top-level doc"}\n')
    assert fingerprint(src) != fp2  # was: unchanged, a stale cache key for a file data prep reads


def test_files_data_prep_skips_or_ignores(tmp_path: Path) -> None:
    d = tmp_path / "chat"
    d.mkdir()
    (d / "a.jsonl").write_text("{}\n")
    fp = fingerprint(str(d), "chat_source")
    (d / "_manifest.json").write_text("{}")  # a `_` path is never an input
    assert fingerprint(str(d), "chat_source") == fp
    (d / "notes.csv").write_text("x")  # skipped for its format, but named in data prep's manifest
    assert fingerprint(str(d), "chat_source") != fp


def test_hub_source_fingerprints_its_spec_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    fp = fingerprint("hf:wikitext:wikitext-2-raw-v1")  # was: "matched no objects"
    assert fp.startswith("sha256:") and fp == fingerprint("hf:wikitext:wikitext-2-raw-v1")
    assert fp != fingerprint("hf:wikitext:wikitext-103-raw-v1")


def test_empty_source_error_names_the_parameter() -> None:
    with pytest.raises(InputDataError, match="^chat_source is empty"):
        fingerprint("", "chat_source")


def test_s3_glob_is_refused_not_read_as_nothing() -> None:
    with pytest.raises(ConfigError, match=r"raw_source 's3://b/raw/\*.jsonl': glob patterns are not supported "
                                          r"on s3:// .*\(s3://b/raw/\)"):
        fingerprint("s3://b/raw/*.jsonl", "raw_source")


def _hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"weights")
    return path


def test_promoted_plain_hf_directory(tmp_path: Path) -> None:
    pointer = default_pointer(str(tmp_path / "store"))
    hf = _hf_dir(tmp_path / "hf")
    entry = {"name": "kubellm", "model_uri": str(hf), "model_digest": "sha256:" + "0" * 64}
    storage_for(pointer).write_bytes(pointer, json.dumps(entry).encode())
    p1 = resolve_promoted(pointer)  # was: "is not a committed artifact"
    assert p1.uri == str(hf.resolve()) and p1.fingerprint.startswith("sha256:")
    fm1 = fingerprint_models([f"base:{hf}"])
    (hf / "model.safetensors").write_bytes(b"re-exported weights")
    st = (hf / "model.safetensors").stat()
    os.utime(hf / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert resolve_promoted(pointer).fingerprint != p1.fingerprint
    assert fingerprint_models([f"base:{hf}"]) != fm1
