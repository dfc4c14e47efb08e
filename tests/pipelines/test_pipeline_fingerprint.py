"""Fingerprints of raw sources and the promoted-model pointer (local backend and S3 via moto)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kubellm.core.errors import ConfigError, InputDataError
from kubellm.core.manifest import publish_dir
from kubellm.core.storage import storage_for
from kubellm.pipelines.fingerprint import (
    default_pointer,
    fingerprint,
    fingerprint_models,
    resolve_models,
    resolve_promoted,
)


def _corpus(d: Path) -> Path:
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text('{"text": "a"}\n')
    (d / "b.jsonl").write_text('{"text": "b"}\n')
    (d / "sub" / "c.txt").write_text("c\n")
    return d


def test_local_dir_stable_and_sensitive(tmp_path: Path) -> None:
    d = _corpus(tmp_path / "raw")
    fp = fingerprint(str(d))
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert fingerprint(str(d)) == fp  # same objects -> same fingerprint (a cache hit)
    (d / "new.jsonl").write_text('{"text": "n"}\n')
    fp2 = fingerprint(str(d))
    assert fp2 != fp  # an added object re-runs the stage
    (d / "a.jsonl").write_text('{"text": "changed, longer"}\n')
    assert fingerprint(str(d)) != fp2  # a changed object too
    fp3 = fingerprint(str(d))
    (d / ".hidden").write_text("x")
    (d / ".b.jsonl.123.tmp").write_text("partial")
    assert fingerprint(str(d)) == fp3  # what data prep never reads does not count


def test_touch_counts_as_change(tmp_path: Path) -> None:
    d = _corpus(tmp_path / "raw")
    fp = fingerprint(str(d))
    st = (d / "a.jsonl").stat()
    os.utime(d / "a.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fingerprint(str(d)) != fp  # local files have no ETag: mtime stands in (never stale)


def test_glob_single_file_and_lists(tmp_path: Path) -> None:
    d = _corpus(tmp_path / "raw")
    both = fingerprint(f"{d}/a.jsonl,{d}/b.jsonl")
    assert both != fingerprint(f"{d}/a.jsonl") != fingerprint(f"{d}/*.jsonl")
    assert fingerprint(f"{d}/*.jsonl") == fingerprint(f"{d}/*.jsonl")


def test_empty_or_missing_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="nope: no such file, directory or glob match"):
        fingerprint(str(tmp_path / "nope"))
    with pytest.raises(InputDataError, match="no such file, directory or glob match"):
        fingerprint(f"{tmp_path}/*.parquet")
    with pytest.raises(InputDataError, match="source is empty"):
        fingerprint(" , ")


def test_s3_prefix_uses_etags(s3_bucket: str) -> None:
    st = storage_for(s3_bucket)
    st.write_bytes(f"{s3_bucket}/raw/a.jsonl", b'{"text": "a"}\n')
    st.write_bytes(f"{s3_bucket}/raw/b.jsonl", b'{"text": "b"}\n')
    st.write_bytes(f"{s3_bucket}/rawother/x.jsonl", b"not under raw/")
    fp = fingerprint(f"{s3_bucket}/raw/")
    assert fingerprint(f"{s3_bucket}/raw") == fingerprint(f"{s3_bucket}/raw")
    st.write_bytes(f"{s3_bucket}/raw/b.jsonl", b'{"text": "B"}\n')  # same size, new ETag
    assert fingerprint(f"{s3_bucket}/raw/") != fp
    assert fingerprint(f"{s3_bucket}/raw/a.jsonl") != fingerprint(f"{s3_bucket}/raw/")
    with pytest.raises(ConfigError, match="glob patterns are not supported on s3://"):
        fingerprint(f"{s3_bucket}/raw/*.jsonl")  # data prep reads no glob on S3
    with pytest.raises(InputDataError, match="no readable objects under this S3 prefix"):
        fingerprint(f"{s3_bucket}/missing/")


def _model(tmp_path: Path, root: str, name: str) -> str:
    src = tmp_path / f"src-{name}"
    src.mkdir()
    (src / "model.safetensors").write_bytes(name.encode())
    return publish_dir(src, f"{root}/models/{name}", kind="model").uri


def _point(pointer: str, model_uri: str) -> None:
    """Write the pointer as the evaluate stage's gate does (kubellm.evaluate.registry)."""
    entry = {"name": "kubellm", "model_uri": model_uri, "model_digest": "sha256:" + "0" * 64}
    storage_for(pointer).write_bytes(pointer, json.dumps(entry).encode())


def test_promoted_pointer(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    pointer = default_pointer(root)
    assert pointer == f"{root}/registry/kubellm/promoted.json"
    nothing = resolve_promoted(pointer)  # nothing promoted yet: no baseline, but the pointer is passed on
    assert (nothing.pointer, nothing.uri, nothing.fingerprint) == (pointer, "", "none")
    with pytest.raises(InputDataError, match="no promoted model yet"):
        resolve_promoted(pointer, required=True)
    m1, m2 = _model(tmp_path, root, "m1"), _model(tmp_path, root, "m2")
    _point(pointer, m1)
    p1 = resolve_promoted(pointer)
    assert p1.uri == m1 and p1.pointer == pointer
    _point(pointer, m2)
    p2 = resolve_promoted(pointer)
    assert p2.uri == m2 and p2.fingerprint != p1.fingerprint  # the pointer moved: re-evaluate
    _point(pointer, str(tmp_path / "gone"))
    with pytest.raises(InputDataError, match="model_uri .*gone is neither a committed artifact"):
        resolve_promoted(pointer)
    # anything but the gate's JSON fails here, naming the pointer, not later in the evaluate stage
    for bad in (json.dumps({"uri": m1}), b'{"name": "kubellm", "model_u', b"{}", b""):
        storage_for(pointer).write_bytes(pointer, bad.encode() if isinstance(bad, str) else bad)
        with pytest.raises(InputDataError, match=f"{pointer}: not a kubellm promoted-model pointer"):
            resolve_promoted(pointer)


def test_resolve_models(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    pointer = default_pointer(root)
    with pytest.raises(InputDataError, match="no models to evaluate"):
        resolve_models([], pointer)
    m1, m2 = _model(tmp_path, root, "m1"), _model(tmp_path, root, "m2")
    _point(pointer, m1)
    models, promoted = resolve_models([], pointer)
    assert models == [m1] and promoted.uri == m1  # default: the promoted model
    models, promoted = resolve_models([f"candidate:{m2}", " "], pointer)
    assert models == [f"candidate:{m2}"] and promoted.uri == m1 and promoted.pointer == pointer  # explicit list; the promoted one is the baseline
    assert fingerprint_models([m1]) != fingerprint_models([m2])
    with pytest.raises(InputDataError, match="model artifact not found"):
        resolve_models([str(tmp_path / "missing")], pointer)
