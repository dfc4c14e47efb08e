"""The data-prep stage end to end: demo world, formats, dedup, determinism, S3 sources, map/reduce."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubellm.core.manifest import Manifest, fetch, read_manifest
from kubellm.core.storage import storage_for
from kubellm.data_prep.config import DataPrepConfig
from kubellm.data_prep.stage import global_dedup, list_sources, prepare_shard, run, write_splits


def _texts(m: Manifest, tmp: Path, split: str = "train") -> list[str]:
    fetch(m, tmp)
    return [t for f in sorted((tmp / split).glob("part-*.parquet")) for t in pq.read_table(f).column("text").to_pylist()]


def test_demo_world_passes_mostly_intact(prepared: Manifest, small_world: dict[str, Path], tmp_path: Path) -> None:
    c = prepared.counts
    assert prepared.kind == "dataset" and c["bad_records"] == 0
    assert c["documents_out"] >= 0.9 * c["documents_in"]
    assert c["train_documents"] + c["validation_documents"] == c["documents_out"] > 0
    assert 0 < c["validation_documents"] < 0.25 * c["documents_out"]
    assert {f.path for f in prepared.files} == {"train/part-00000.parquet", "validation/part-00000.parquet"}
    rows = {r["name"]: r for r in prepared.metadata["report"]}
    assert set(rows) >= {"min_words", "max_top_ngram_fraction", "exact_duplicate", "near_duplicate"}
    removed = sum(r["documents"] for r in rows.values())
    assert removed == c["documents_in"] - c["documents_out"]
    assert "| dedup | near_duplicate |" in (prepared.report_markdown or "")
    train = _texts(prepared, tmp_path)
    corpus = {json.loads(line)["text"] for f in small_world["corpus"].glob("*.jsonl")
              for line in f.read_text().splitlines()}
    assert set(train) <= corpus and len(set(train)) == len(train)


def test_rerun_is_deterministic_and_reuses_the_committed_artifact(prepared: Manifest,
                                                                  small_world: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    again = run(DataPrepConfig(validation_fraction=0.1), {"raw": str(small_world["corpus"])}, str(tmp_path))
    assert [(f.path, f.sha256) for f in again.files] == [(f.path, f.sha256) for f in prepared.files]
    assert again.uri != prepared.uri
    # same sources + config + output root: the committed artifact is returned, not rebuilt
    assert run(DataPrepConfig(validation_fraction=0.1), {"raw": str(small_world["corpus"])},
               str(tmp_path)).created_at == again.created_at


def _random_doc(i: int) -> str:
    rng = random.Random(i)
    words = [a + b + c for a in ("ka", "lo", "mir", "tes", "vol") for b in ("ran", "do", "sel", "qui")
             for c in ("n", "ta", "mo", "ris", "bel")]
    return " ".join(rng.sample(words, 40)) + "."


def test_formats_dedup_and_pii(tmp_path: Path) -> None:
    docs = [_random_doc(i) for i in range(12)]
    raw = tmp_path / "raw"
    raw.mkdir()
    with gzip.open(raw / "a.jsonl.gz", "wt") as f:
        for d in docs[:4]:
            f.write(json.dumps({"content": d}) + "\n")
    (raw / "b.json").write_text(json.dumps([{"content": d} for d in docs[4:7]]))
    pq.write_table(pa.table({"content": docs[7:10]}), raw / "c.parquet")
    (raw / "d.txt").write_text("\n\n".join(docs[10:12] + [
        docs[0].upper(),  # exact duplicate after case folding
        docs[1] + " and one more",  # near duplicate
        "Write to jane@example.org about " + _random_doc(99),
    ]) + "\n")
    cfg = DataPrepConfig(text_field="content", validation_fraction=0.0, pii={"enabled": True})
    m = run(cfg, {"raw": f"{raw}/*.jsonl.gz,{raw}/b.json,{raw}/c.parquet,{raw}/d.txt"}, str(tmp_path / "o"))
    c = m.counts
    assert c["sources"] == 4 and c["documents_in"] == 15
    assert c["removed_exact_duplicate"] == 1 and c["removed_near_duplicate"] == 1
    assert c["pii_documents"] == 1 and c["documents_out"] == 13
    out = _texts(m, tmp_path / "f")
    assert out[:12] == docs and "<EMAIL>" in out[12] and "jane@" not in "".join(out)


def test_dedup_can_be_switched_off(tmp_path: Path) -> None:
    doc = ("The harbour of Kelport fills with boats every morning, and the sailors sing old songs "
           "while they mend their nets in the warm sun before the fish market opens.")
    (tmp_path / "x.jsonl").write_text((json.dumps({"text": doc}) + "\n") * 3)
    cfg = DataPrepConfig(validation_fraction=0.0, dedup={"exact": False, "near": False})
    assert run(cfg, {"raw": str(tmp_path / "x.jsonl")}, str(tmp_path / "o")).counts["documents_out"] == 3


def test_s3_sources_are_staged_through_the_storage_layer(s3_bucket: str, small_world: dict[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    st = storage_for(s3_bucket)
    files = sorted(small_world["corpus"].glob("*.jsonl"))
    for f in files:
        st.upload(f, f"{s3_bucket}/raw/corpus/{f.name}")
    downloads: list[str] = []
    real = type(st).download
    monkeypatch.setattr(type(st), "download", lambda self, uri, local: (downloads.append(uri),
                                                                         real(self, uri, local))[1])
    m = run(DataPrepConfig(), {"raw": f"{s3_bucket}/raw/corpus"}, f"{s3_bucket}/artifacts")
    assert m.uri.startswith(f"{s3_bucket}/artifacts/data_prep/")
    assert read_manifest(m.uri).files == m.files and m.counts["documents_out"] > 0
    assert sorted(downloads) == sorted(f"{s3_bucket}/raw/corpus/{f.name}" for f in files)
    # a single object works too
    one = run(DataPrepConfig(), {"raw": f"{s3_bucket}/raw/corpus/{files[0].name}"}, f"{s3_bucket}/artifacts")
    assert one.counts["sources"] == 1


def test_map_reduce_functions_with_an_s3_work_prefix(s3_bucket: str, small_world: dict[str, Path],
                                                    tmp_path: Path) -> None:
    """What a ParallelFor fan-out does: each map step in its own 'pod', state only in S3."""
    cfg = DataPrepConfig(validation_fraction=0.1)
    sources = list_sources(str(small_world["corpus"]))
    work = f"{s3_bucket}/work"
    stats = [prepare_shard(s.uri, i, cfg, work) for i, s in enumerate(sources)]  # URIs, as ParallelFor items
    assert all(s["records"] > 0 for s in stats)
    assert storage_for(work).exists(f"{work}/shard-00000/minhash.bin")
    global_dedup(work, cfg, len(sources))
    splits = write_splits(work, cfg, len(sources), tmp_path / "out")
    local = run(cfg, {"raw": str(small_world["corpus"])}, str(tmp_path / "ref"))
    assert splits["train"]["documents"] == local.counts["train_documents"]
    assert splits["validation"]["documents"] == local.counts["validation_documents"]


def test_the_reduce_and_the_write_share_one_fetch_of_an_s3_work_prefix(s3_bucket: str, small_world: dict[str, Path],
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The fan-out's reduce step (`_finish`) downloaded every shard's documents for the dedup and again
    for the write: the corpus twice."""
    import kubellm.data_prep.stage as stage

    cfg = DataPrepConfig(validation_fraction=0.1)
    sources = list_sources(str(small_world["corpus"]))
    work = f"{s3_bucket}/work2"
    stats = [prepare_shard(s.uri, i, cfg, work) for i, s in enumerate(sources)]
    st = storage_for(work)
    real = type(st).download
    fetched: list[str] = []
    monkeypatch.setattr(type(st), "download", lambda self, uri, local: fetched.append(uri) or real(self, uri, local))
    m = stage._finish([s.uri for s in sources], stats, cfg, work, str(small_world["corpus"]), tmp_path,
                      str(tmp_path / "out" / "data_prep" / "x"), {}, [])
    docs = [u for u in fetched if u.endswith("docs.parquet")]
    assert len(docs) == len(sources) == len(set(docs)) and m.counts["documents_out"] > 0


def test_map_reduce_functions_with_a_file_uri_work_prefix(small_world: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A `file://` work prefix is that directory, not `./file:/…` under each pod's working directory
    (where the reduce step, in another pod, could not find the map output)."""
    cfg = DataPrepConfig(validation_fraction=0.1)
    sources = list_sources(str(small_world["corpus"]))
    monkeypatch.chdir(tmp_path)
    work = f"file://{tmp_path}/shared/work"
    stats = [prepare_shard(s.uri, i, cfg, work) for i, s in enumerate(sources)]
    assert all(s["records"] > 0 for s in stats)
    assert (tmp_path / "shared/work/shard-00000").is_dir() and not (tmp_path / "file:").exists()
    global_dedup(work, cfg, len(sources))
    assert write_splits(work, cfg, len(sources), tmp_path / "out")["train"]["documents"] > 0


def test_a_hub_dataset_without_the_text_field_fails_at_its_first_row(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from kubellm.core.errors import InputDataError

    served = []

    def rows():  # type: ignore[no-untyped-def]
        for i in range(1000):
            served.append(i)
            yield {"content": f"row {i}", "id": i}

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rows())
    with pytest.raises(InputDataError, match=r"hf:org/ds: its rows have no field 'text' \(data_prep.text_field\); "
                                             r"the fields they have: 'content', 'id'"):
        run(DataPrepConfig(), {"raw": "hf:org/ds"}, str(tmp_path / "out"))
    assert served == [0]  # not the whole stream read first


def test_write_batches_end_at_a_byte_cap_and_the_output_is_unchanged(small_world: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory is bounded by bytes as well as by document count: with a tiny cap every document is its
    own write batch (a row group), and the shards hold the same documents in the same parts."""
    import kubellm.data_prep.stage as stage

    cfg = DataPrepConfig(validation_fraction=0.1, docs_per_shard=20)
    ref = run(cfg, {"raw": str(small_world["corpus"])}, str(tmp_path / "ref"))
    monkeypatch.setattr(stage, "_BATCH_BYTES", 1)
    capped = run(cfg, {"raw": str(small_world["corpus"])}, str(tmp_path / "capped"))
    parts = [f.path for f in ref.files if f.path.endswith(".parquet")]
    assert parts == [f.path for f in capped.files if f.path.endswith(".parquet")] and len(parts) > 2
    for part in parts:
        a, b = (pq.ParquetFile(Path(m.uri) / part) for m in (ref, capped))
        assert a.read().column("text").to_pylist() == b.read().column("text").to_pylist()
        assert a.metadata.num_row_groups == 1 and b.metadata.num_row_groups == b.metadata.num_rows > 1


def test_hub_sources_stream_through_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []
    doc = ("A library in Brisa keeps thousands of old maps, and the librarians are happy to show "
           "them to anyone who asks politely about the roads to the northern villages.")

    def fake_load(name: str, config: str | None = None, split: str = "train", streaming: bool = False):  # type: ignore[no-untyped-def]
        calls.append((name, config, split, streaming))
        return iter([{"text": doc}, {"text": doc.replace("maps", "books")}, {"text": None}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    m = run(DataPrepConfig(validation_fraction=0.0, max_bad_fraction=0.5, dedup={"near": False}),
            {"raw": "hf:someorg/corpus:en"}, str(tmp_path))
    assert calls == [("someorg/corpus", "en", "train", True)]
    assert m.counts["documents_out"] == 2 and m.counts["removed_missing_field"] == 1


def test_num_proc_is_left_out_of_the_config_hash(prepared: Manifest, small_world: dict[str, Path]) -> None:
    """num_proc only schedules the map (outputs are byte-identical), like the fan-out settings: a run
    with another process count finds the artifact already committed instead of rebuilding it."""
    base = DataPrepConfig(validation_fraction=0.1)
    assert DataPrepConfig(validation_fraction=0.1, num_proc=4).config_hash() == base.config_hash()
    assert DataPrepConfig(validation_fraction=0.2, num_proc=4).config_hash() != base.config_hash()
    root = str(Path(prepared.uri).parent.parent)
    again = run(DataPrepConfig(validation_fraction=0.1, num_proc=4), {"raw": str(small_world["corpus"])}, root)
    assert again.uri == prepared.uri and again.created_at == prepared.created_at
    assert "num_proc" not in prepared.metadata["config"]
