"""Local directory and glob scans agree: a file of unknown format is skipped and named (warning, manifest,
report) by both, an item holding only such files says so, and a `datasets` save_to_disk directory is read
with `load_from_disk` instead of its JSON metadata being parsed as corpus records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kubellm.core.errors import ConfigError, InputDataError
from kubellm.data_prep.config import DataPrepConfig
from kubellm.data_prep.readers import read_records
from kubellm.data_prep.sources import ARROW, resolve_sources, scan_sources
from kubellm.data_prep.stage import fan_out_shards, prepare_fan_out_shard, reduce_fan_out, run

TEXT = ("Velmora is a quiet city with old stone bridges, a busy market and a harbour where the "
        "sailors sing in the evening; document {i} tells the story of its bakers and painters.")


def _lines(texts: list[str], field: str = "text") -> str:
    return "".join(json.dumps({field: t}) + "\n" for t in texts)


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "a.jsonl").write_text(_lines([TEXT.format(i=i) for i in range(10)]))
    (raw / "b.csv").write_text("text\nhello\n")
    (raw / "sub" / "c.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    (raw / "sub" / "d.arrow").write_bytes(b"ARROW1")
    return raw


def test_directory_and_glob_skip_the_same_unknown_files_and_warn(mixed: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="kubellm.data_prep.sources"):
        by_dir = scan_sources(str(mixed))
    by_glob = scan_sources(f"{mixed}/**/*")
    expected_skip = [str(mixed / "b.csv"), str(mixed / "sub" / "c.jsonl.zst"), str(mixed / "sub" / "d.arrow")]
    assert [s.uri for s in by_dir.sources] == [s.uri for s in by_glob.sources] == [str(mixed / "a.jsonl")]
    assert by_dir.skipped == by_glob.skipped == expected_skip  # the glob used to fail: "unknown format"
    assert f"{mixed}: skipping 3 file(s)" in caplog.text and "b.csv" in caplog.text
    # a file named on its own is an explicit choice: an unknown format is an error, as before
    with pytest.raises(ConfigError, match=r"b\.csv: unknown format"):
        resolve_sources(str(mixed / "b.csv"))


def test_an_item_with_only_unreadable_files_says_so(mixed: Path, tmp_path: Path) -> None:
    (mixed / "a.jsonl").unlink()
    with pytest.raises(InputDataError, match=r"raw: no readable files \(skipped, no reader for their format: "
                                             r".*b\.csv, .*c\.jsonl\.zst, .*d\.arrow\)"):
        resolve_sources(str(mixed))
    with pytest.raises(InputDataError, match=r"no readable files \(skipped, no reader for their format: .*b\.csv\)"):
        resolve_sources(f"{mixed}/*.csv")
    empty = tmp_path / "empty"
    (empty / "_tmp").mkdir(parents=True)
    (empty / "_tmp" / "x.jsonl").write_text(_lines(["x"]))
    with pytest.raises(InputDataError, match=r"empty: no readable files in this directory"):
        resolve_sources(str(empty))
    with pytest.raises(InputDataError, match=r"nope: no such file, directory or glob match"):
        resolve_sources(str(tmp_path / "nope"))


def test_skipped_files_are_named_in_the_manifest_and_report(mixed: Path, tmp_path: Path) -> None:
    m = run(DataPrepConfig(validation_fraction=0.0), {"raw": str(mixed)}, str(tmp_path / "out"))
    assert m.counts["skipped_inputs"] == 3
    assert m.metadata["skipped_inputs"] == [str(mixed / "b.csv"), str(mixed / "sub" / "c.jsonl.zst"),
                                            str(mixed / "sub" / "d.arrow")]
    assert "**3 input file(s) skipped**" in (m.report_markdown or "") and "b.csv" in (m.report_markdown or "")
    # the fanned-out stage records the same (list-shards carries them to the reduce)
    cfg = DataPrepConfig(validation_fraction=0.0)
    shards = fan_out_shards(str(mixed), cfg, str(tmp_path / "fan"), "run1")
    for shard in shards:
        prepare_fan_out_shard(json.loads(json.dumps(shard)), cfg)  # the items travel as JSON
    fan = reduce_fan_out([json.loads(json.dumps(s)) for s in shards], cfg, str(tmp_path / "fan"))
    assert fan.counts == m.counts and fan.metadata["skipped_inputs"] == m.metadata["skipped_inputs"]
    assert fan.report_markdown == m.report_markdown


def _save(path: Path, docs: list[str], **extra: list[object]) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": docs, **extra}).save_to_disk(str(path), num_shards=2)


def test_save_to_disk_directory_is_read_with_load_from_disk(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    docs = [TEXT.format(i=i) for i in range(20)]
    _save(raw / "hfds", docs, id=list(range(20)))
    (raw / "more.jsonl").write_text(_lines([TEXT.format(i=100 + i) for i in range(5)]))
    scan = scan_sources(str(raw))
    [ds, more] = scan.sources
    assert (ds.uri, ds.format, more.uri, scan.skipped) == (str(raw / "hfds"), ARROW, str(raw / "more.jsonl"), [])
    recs = list(read_records(ds, Path(ds.uri), field="text", max_bytes=1 << 20))
    assert [r.text for r in recs] == docs and recs[5].where == f"{raw / 'hfds'}:row 5"
    # the directory named directly, and through a glob, is the same one source
    assert [s.uri for s in resolve_sources(str(raw / "hfds"))] == [ds.uri]
    assert [s.uri for s in resolve_sources(f"{raw}/**")] == [ds.uri, more.uri]
    m = run(DataPrepConfig(validation_fraction=0.0), {"raw": str(raw)}, str(tmp_path / "out"))
    assert m.counts["records"] == 25 and m.counts["bad_records"] == 0  # no state.json lines as records
    assert m.counts["documents_in"] == 25
    # the fingerprint covers its arrow files
    arrow = sorted((raw / "hfds").glob("*.arrow"))[1]
    shutil.copyfile(sorted((raw / "hfds").glob("*.arrow"))[0], arrow)
    assert resolve_sources(str(raw / "hfds"))[0].fingerprint != ds.fingerprint


def test_save_to_disk_text_field_split_and_errors(tmp_path: Path) -> None:
    import datasets

    docs = [TEXT.format(i=i) for i in range(6)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": docs}),
                               "test": datasets.Dataset.from_dict({"body": ["held out"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    [src] = resolve_sources(str(tmp_path))  # the DatasetDict is one source, not one per split
    assert (src.uri, src.format) == (str(tmp_path / "dd"), ARROW)
    assert [r.text for r in read_records(src, Path(src.uri), field="body", max_bytes=1 << 20)] == docs
    assert [r.text for r in read_records(src, Path(src.uri), field="body", max_bytes=1 << 20,
                                         hub_split="test")] == ["held out"]
    with pytest.raises(InputDataError, match=r"dd: this DatasetDict has no split 'dev' \(data_prep.hub_split\); "
                                             r"its splits are \['train', 'test'\]"):
        list(read_records(src, Path(src.uri), field="body", max_bytes=1 << 20, hub_split="dev"))
    with pytest.raises(InputDataError, match=r"dd\[train\]: no column 'text' \(data_prep.text_field\); the "
                                             r"columns are \['body'\]"):
        list(read_records(src, Path(src.uri), field="text", max_bytes=1 << 20))
    datasets.Dataset.from_dict({"text": [1, 2]}).save_to_disk(str(tmp_path / "ints"))
    [ints] = resolve_sources(str(tmp_path / "ints"))
    with pytest.raises(InputDataError, match=r"ints: column 'text' \(data_prep.text_field\) holds .*int64.*"
                                             r"expected strings"):
        list(read_records(ints, Path(ints.uri), field="text", max_bytes=1 << 20))
    (tmp_path / "ints" / "state.json").write_text("{not json")
    with pytest.raises(InputDataError, match=r"ints: not a readable `datasets` save_to_disk directory"):
        list(read_records(ints, Path(ints.uri), field="text", max_bytes=1 << 20))
