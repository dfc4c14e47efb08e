"""Manifests: atomic publish, refusal of uncommitted prefixes, verified fetch, content addresses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubellm.core.errors import IntegrityError, ManifestConflictError, ManifestMissingError
from kubellm.core.manifest import (
    MANIFEST_NAME,
    Manifest,
    commit_manifest,
    content_prefix,
    fetch,
    load_manifest_ref,
    publish_dir,
    read_manifest,
    write_manifest_file,
)
from kubellm.core.storage import join, storage_for


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket")


def _data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    (d / "train").mkdir(parents=True, exist_ok=True)
    (d / "train" / "part-0.txt").write_text("alpha")
    (d / "meta.json").write_text("{}")
    return d


def test_publish_then_read_and_fetch(root: str, tmp_path: Path) -> None:
    prefix = content_prefix(root, "data_prep", "cfg", {"raw": "fp"})
    m = publish_dir(_data(tmp_path), prefix, kind="dataset", counts={"documents": 1}, config_hash="cfg")
    assert [f.path for f in m.files] == ["meta.json", "train/part-0.txt"]
    back = read_manifest(prefix)
    assert back.digest() == m.digest() and back.counts == {"documents": 1}
    out = fetch(back, tmp_path / "fetched")
    assert (out / "train" / "part-0.txt").read_text() == "alpha"


def test_prefix_without_manifest_is_refused(root: str, tmp_path: Path) -> None:
    prefix = join(root, "torn")
    storage_for(prefix).write_bytes(join(prefix, "part-0.txt"), b"half")
    with pytest.raises(ManifestMissingError, match="torn"):
        read_manifest(prefix)


def test_committed_manifest_is_never_overwritten(root: str, tmp_path: Path) -> None:
    prefix = join(root, "art")
    m = publish_dir(_data(tmp_path), prefix, kind="dataset")
    # Re-publishing the same content is idempotent (returns the committed one) ...
    again = publish_dir(_data(tmp_path), prefix, kind="dataset")
    assert again.digest() == m.digest()
    # ... but a different artifact at the same prefix is refused, and the original stays.
    other = Manifest(kind="dataset", uri=prefix, files=[], counts={"documents": 99})
    with pytest.raises(ManifestConflictError, match="refusing to overwrite"):
        commit_manifest(other)
    assert read_manifest(prefix).digest() == m.digest()


def test_fetch_detects_corruption_and_missing_files(root: str, tmp_path: Path) -> None:
    prefix = join(root, "art2")
    m = publish_dir(_data(tmp_path), prefix, kind="dataset")
    st = storage_for(prefix)
    st.write_bytes(join(prefix, "train/part-0.txt"), b"alphA")  # same size, different bytes
    with pytest.raises(IntegrityError, match="part-0.txt.*sha256"):
        fetch(m, tmp_path / "f1")
    st.delete(join(prefix, "meta.json"))
    with pytest.raises(IntegrityError, match="meta.json"):
        fetch(m, tmp_path / "f2", paths=["meta.json"])


def test_content_prefix_depends_on_config_and_parents(tmp_path: Path) -> None:
    a = content_prefix("s3://b/r", "tokenizer", "h1", {"dataset": "d1"})
    assert a == content_prefix("s3://b/r", "tokenizer", "h1", {"dataset": "d1"})
    assert a != content_prefix("s3://b/r", "tokenizer", "h2", {"dataset": "d1"})
    assert a != content_prefix("s3://b/r", "tokenizer", "h1", {"dataset": "d2"})
    assert a.startswith("s3://b/r/tokenizer/")


def test_manifest_name_reserved_and_refs(tmp_path: Path) -> None:
    d = _data(tmp_path)
    (d / MANIFEST_NAME).write_text("{}")
    with pytest.raises(IntegrityError, match="reserved"):
        publish_dir(d, str(tmp_path / "x"), kind="dataset")
    (d / MANIFEST_NAME).unlink()
    m = publish_dir(d, str(tmp_path / "y"), kind="dataset")
    write_manifest_file(m, tmp_path / "artifact" / "dataset.json")
    assert load_manifest_ref(str(tmp_path / "artifact" / "dataset.json")).digest() == m.digest()
    assert load_manifest_ref(str(tmp_path / "y")).digest() == m.digest()
    assert load_manifest_ref(str(tmp_path / "artifact")).digest() == m.digest()  # a KFP artifact dir
    # a folder holding one .json among other files is not an artifact dir: its .json was parsed as a
    # manifest (pydantic's dump about world.json), now it is "no _manifest.json"
    world = tmp_path / "world"
    world.mkdir()
    (world / "world.json").write_text('{"seed": 1}')
    (world / "corpus").mkdir()
    with pytest.raises(ManifestMissingError, match="no _manifest.json"):
        load_manifest_ref(str(world))
    with pytest.raises(IntegrityError, match="not a valid kubellm manifest"):
        Manifest.from_json("{\"kind\": 3}", source="bad.json")


@pytest.mark.parametrize("bad", ["train/../../evil/x.parquet", "/etc/passwd", "a//b", "./a", "a\\b", ""])
def test_file_paths_outside_the_artifact_are_refused(tmp_path: Path, bad: str) -> None:
    prefix = tmp_path / "art"
    prefix.mkdir()
    body = Manifest(kind="dataset", uri=str(prefix)).model_dump(mode="json")
    body["files"] = [{"path": bad, "size": 1, "sha256": "0" * 64}]
    (prefix / MANIFEST_NAME).write_text(__import__("json").dumps(body))
    with pytest.raises(IntegrityError, match=f"(?s){MANIFEST_NAME}: not a valid kubellm manifest.*files.0.path.*expected a relative path"):
        read_manifest(str(prefix))
    assert not (tmp_path / "evil").exists()


def test_a_relative_output_is_recorded_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    m = publish_dir(_data(tmp_path), content_prefix("store", "data_prep", "cfg"), kind="dataset")
    assert m.uri.startswith(str(tmp_path / "store") + "/")
    monkeypatch.chdir("/")  # a reader elsewhere (the next stage run from another directory)
    assert fetch(read_manifest(m.uri), tmp_path / "out").joinpath("meta.json").read_text() == "{}"


def test_a_copied_artifact_reads_and_verifies_its_own_files(tmp_path: Path) -> None:
    import shutil

    m = publish_dir(_data(tmp_path), str(tmp_path / "store" / "art"), kind="dataset")
    copy = tmp_path / "elsewhere" / "art"
    shutil.copytree(m.uri, copy)
    back = read_manifest(str(copy))
    assert back.uri == str(copy) and back.files == m.files
    (copy / "train" / "part-0.txt").write_text("tampered")  # the copy's file, not the original's
    with pytest.raises(IntegrityError, match=f"{copy}/train/part-0.txt: size"):
        fetch(back, tmp_path / "fetched")
    assert read_manifest(m.uri).uri == m.uri  # the original is read in place, as before


def test_a_nonfinite_metric_is_committed_readably(root: str, tmp_path: Path) -> None:
    """A run whose last loss was NaN (train.nonfinite=skip) publishes; the manifest reads back (strict
    JSON has no NaN: pydantic had written null into a float metric and refused it on every read)."""
    prefix = content_prefix(root, "pretrain", "cfg", {})
    m = publish_dir(_data(tmp_path), prefix, kind="model",
                    metrics={"loss_final": float("nan"), "loss_start": 2.5, "ppl": float("-inf")})
    back = read_manifest(prefix)
    assert back.metrics == {"loss_start": 2.5}
    assert back.metadata["nonfinite_metrics"] == {"loss_final": "nan", "ppl": "-inf"}
    assert back.digest() == m.digest()


def test_code_version_tracks_the_installed_code(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Images pin it (the build's git sha); elsewhere it hashes the package's files, so a local re-run
    after a code change gets a new content address (it was the constant package version)."""
    from kubellm import __version__
    from kubellm.core import manifest as M

    monkeypatch.setenv("KUBELLM_CODE_VERSION", "")
    local = M.code_version()
    assert local == f"kubellm-{__version__}+{M._source_hash()[:12]}"
    assert os.environ["KUBELLM_CODE_VERSION"] == local  # exported: processes started from here agree
    before = content_prefix(str(tmp_path), "data_prep", "cfg", {})
    monkeypatch.setenv("KUBELLM_CODE_VERSION", "")  # a new process after an edit
    monkeypatch.setattr(M, "_source_hash", lambda: "f" * 64)
    assert content_prefix(str(tmp_path), "data_prep", "cfg", {}) != before
    monkeypatch.setenv("KUBELLM_CODE_VERSION", "0123abc")
    assert M.code_version() == "0123abc"
    # an image built without the build argument says "unknown": not a version two builds may share
    monkeypatch.setenv("KUBELLM_CODE_VERSION", "unknown")
    assert M.code_version() == f"kubellm-{__version__}+{'f' * 12}"


def test_the_code_version_covers_the_pipelines_package_where_it_lives_apart() -> None:
    """An editable install maps kubellm.pipelines to the repository's pipelines/: its edits (the
    pipeline's steps and parameters) count too."""
    import kubellm.pipelines
    from kubellm.core import manifest as M
    from kubellm.core.manifest import tree_hash

    root = Path(M.__file__).resolve().parent.parent
    pipes = Path(kubellm.pipelines.__file__).resolve().parent
    if pipes.is_relative_to(root):
        assert M._source_hash() == tree_hash(root)
    else:
        assert M._source_hash() not in (tree_hash(root), tree_hash(pipes)) and len(M._source_hash()) == 64


def test_presets_and_bundled_task_data_are_not_part_of_the_code_version(tmp_path: Path) -> None:
    """Editing `dpo.beta` in a preset changes DPO's config hash, not the code version: it had re-run
    data prep, the tokenizer and pretraining too. Code (and the bundled tasks' scoring code) still counts."""
    from kubellm.core.manifest import tree_hash

    for rel, text in {"core/a.py": "x = 1\n", "configs/debug.yaml": "dpo: {beta: 0.1}\n",
                      "evaluate/tasks/kubellm_knowledge.yaml": "task: k\n", "evaluate/tasks/data/k.jsonl": "{}\n",
                      "evaluate/tasks/utils.py": "def f(): ...\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    base = tree_hash(tmp_path)
    for rel in ("configs/debug.yaml", "evaluate/tasks/kubellm_knowledge.yaml", "evaluate/tasks/data/k.jsonl"):
        (tmp_path / rel).write_text("changed\n")
        assert tree_hash(tmp_path) == base, rel
    for rel in ("core/a.py", "evaluate/tasks/utils.py"):
        (tmp_path / rel).write_text("changed = True\n")
        assert tree_hash(tmp_path) != base, rel
        base = tree_hash(tmp_path)
