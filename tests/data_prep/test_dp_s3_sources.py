"""Raw sources on S3 (moto's server): staged copies never collide, the prefix scan follows the local
scan's rules (`_`/`.` paths are no inputs; unknown formats are skipped and named), and a `datasets`
save_to_disk directory uploaded under a prefix is read as one dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubellm.core.errors import ConfigError, InputDataError
from kubellm.core.storage import storage_for
from kubellm.data_prep.config import DataPrepConfig
from kubellm.data_prep.readers import read_records
from kubellm.data_prep.sources import ARROW, resolve_sources, scan_sources, stage_local
from kubellm.data_prep.stage import run

TEXT = ("Velmora is a quiet city with old stone bridges, a busy market and a harbour where the "
        "sailors sing in the evening; document {i} tells the story of its bakers and painters.")


def _put(uri: str, data: bytes | str) -> None:
    storage_for(uri).write_bytes(uri, data.encode() if isinstance(data, str) else data)


def _lines(*texts: str) -> str:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts)


def test_objects_with_one_base_name_stage_to_distinct_files_in_input_order(s3_bucket: str, tmp_path: Path) -> None:
    """`chat/en/train.jsonl` and `chat/fr/train.jsonl` used to be staged to one `tmp/train.jsonl`: the
    second download replaced the first, and SFT/DPO (`[stage_local(s, tmp) for s in resolve_sources(raw)]`)
    read one file twice and the other never."""
    _put(f"{s3_bucket}/chat/en/train.jsonl", _lines("hello"))
    _put(f"{s3_bucket}/chat/fr/train.jsonl", _lines("bonjour", "salut"))
    _put(f"{s3_bucket}/chat/train.jsonl", _lines("top"))
    sources = resolve_sources(f"{s3_bucket}/chat")
    assert [s.uri for s in sources] == [f"{s3_bucket}/chat/en/train.jsonl", f"{s3_bucket}/chat/fr/train.jsonl",
                                        f"{s3_bucket}/chat/train.jsonl"]
    staged = [stage_local(s, tmp_path) for s in sources]  # SFT's and DPO's stage_jsonl, verbatim
    assert len(set(staged)) == 3
    assert all(p.name == "train.jsonl" and p.is_relative_to(tmp_path) for p in staged)
    assert [p.read_text() for p in staged] == [_lines("hello"), _lines("bonjour", "salut"), _lines("top")]
    # staging one source again lands on its own file, not on another's
    assert stage_local(sources[1], tmp_path) == staged[1] and staged[0].read_text() == _lines("hello")


def test_prefix_scan_leaves_out_underscore_and_dot_paths_like_the_local_scan(s3_bucket: str, tmp_path: Path) -> None:
    root = f"{s3_bucket}/raw"
    _put(f"{root}/good.jsonl", _lines(TEXT.format(i=1)))
    _put(f"{root}/_manifest.json", json.dumps({"kind": "dataset"}))
    _put(f"{root}/.hidden/secret.jsonl", _lines("hidden"))
    _put(f"{root}/_tmp/partial.jsonl", _lines("half an upload"))
    _put(f"{root}/sub/.x.jsonl", _lines("dotfile"))
    _put(f"{root}/dir/", b"")  # a console's folder marker
    local = tmp_path / "raw"
    for rel in ("good.jsonl", "_manifest.json", ".hidden/secret.jsonl", "_tmp/partial.jsonl", "sub/.x.jsonl"):
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_text(_lines("x"))
    s3_scan = scan_sources(root)
    assert [s.uri for s in s3_scan.sources] == [f"{root}/good.jsonl"] and s3_scan.skipped == []
    assert [Path(s.uri).name for s in resolve_sources(str(local))] == ["good.jsonl"]  # the same rule
    # named on its own, an object under such a path is still an input (as a local file is)
    assert [s.uri for s in resolve_sources(f"{root}/_tmp/partial.jsonl")] == [f"{root}/_tmp/partial.jsonl"]
    only_hidden = f"{s3_bucket}/hidden"
    _put(f"{only_hidden}/_tmp/a.jsonl", _lines("x"))
    with pytest.raises(InputDataError, match=r"hidden: no readable objects under this S3 prefix \(its 1 object"
                                             r"\(s\) are folder markers or under `_`/`.` paths"):
        resolve_sources(only_hidden)


def test_prefix_scan_skips_unknown_formats_and_names_them(s3_bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    root = f"{s3_bucket}/mixed"
    _put(f"{root}/a.jsonl", _lines(TEXT.format(i=1)))
    _put(f"{root}/b.csv", "text\nhello\n")
    _put(f"{root}/c.jsonl.zst", b"\x28\xb5\x2f\xfd")
    with caplog.at_level("WARNING", logger="kubellm.data_prep.sources"):
        scan = scan_sources(root)
    assert [s.uri for s in scan.sources] == [f"{root}/a.jsonl"]
    assert scan.skipped == [f"{root}/b.csv", f"{root}/c.jsonl.zst"]
    assert "skipping 2 file(s)" in caplog.text and "b.csv" in caplog.text and "c.jsonl.zst" in caplog.text
    only = f"{s3_bucket}/csv-only"
    _put(f"{only}/x.csv", "a,b\n")
    with pytest.raises(InputDataError, match=r"csv-only: no readable objects under this S3 prefix \(skipped, no "
                                             r"reader for their format: s3://.*/csv-only/x\.csv\)"):
        resolve_sources(only)
    # named on its own, as a local file: an unknown format is an error; a missing one says so
    with pytest.raises(ConfigError, match=r"csv-only/x\.csv: unknown format"):
        resolve_sources(f"{only}/x.csv")
    with pytest.raises(InputDataError, match=r"csv-only/y\.jsonl: no readable objects under this S3 prefix "
                                             r"\(no such object, and nothing is stored under it\)"):
        resolve_sources(f"{only}/y.jsonl")


def test_save_to_disk_directory_on_s3_is_read_as_one_dataset(s3_bucket: str, tmp_path: Path) -> None:
    import datasets

    docs = [TEXT.format(i=i) for i in range(12)]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": docs, "id": list(range(12))}).save_to_disk(str(saved), num_shards=2)
    root = f"{s3_bucket}/corpus"
    for f in sorted(saved.iterdir()):
        storage_for(root).upload(f, f"{root}/ds/{f.name}")
    _put(f"{root}/extra.jsonl", _lines(TEXT.format(i=100)))
    [ds, extra] = resolve_sources(root)
    assert (ds.uri, ds.format, extra.uri) == (f"{root}/ds", ARROW, f"{root}/extra.jsonl")
    local = stage_local(ds, tmp_path / "stage")
    assert local.name == "ds" and sorted(p.name for p in local.iterdir()) == sorted(p.name for p in saved.iterdir())
    recs = list(read_records(ds, local, field="text", max_bytes=1 << 20))
    assert [r.text for r in recs] == docs and recs[3].where == f"{root}/ds:row 3"
    m = run(DataPrepConfig(validation_fraction=0.0), {"raw": root}, str(tmp_path / "out"))
    assert m.counts["records"] == 13 and m.counts["bad_records"] == 0
    assert m.metadata["sources"] == [f"{root}/ds", f"{root}/extra.jsonl"]
    # the fingerprint covers the dataset's files: a changed arrow file is another input
    first, second = sorted(saved.glob("*.arrow"))
    storage_for(root).upload(first, f"{root}/ds/{second.name}")
    assert resolve_sources(root)[0].fingerprint != ds.fingerprint


def test_one_object_named_by_its_key_is_found_by_one_head_request_not_a_listing_of_its_siblings(
        s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Naming `raw/x.jsonl` had listed all of `raw/` to find it (twice per fan-out pod: O(files²) listed
    objects over a fan-out of a large prefix)."""
    for i in range(5):
        _put(f"{s3_bucket}/raw/s{i}.jsonl", _lines(f"doc {i}"))
    st = storage_for(s3_bucket)
    listed: list[str] = []
    real_list = type(st).list
    monkeypatch.setattr(type(st), "list", lambda self, prefix: listed.append(prefix) or real_list(self, prefix))
    (src,) = resolve_sources(f"{s3_bucket}/raw/s3.jsonl")
    assert src.uri == f"{s3_bucket}/raw/s3.jsonl" and src.format == "jsonl"
    assert listed == [f"{s3_bucket}/raw/s3.jsonl"]  # only the prefix of that name (empty), never raw/
    # the fingerprint is the one the prefix scan gives the same object (the fan-out's recheck compares them)
    assert src.fingerprint == [s for s in resolve_sources(f"{s3_bucket}/raw") if s.uri == src.uri][0].fingerprint
    assert st.head(f"{s3_bucket}/raw/none.jsonl") is None
