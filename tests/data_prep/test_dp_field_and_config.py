"""A JSON file whose records all lack the configured text field fails at once naming the keys it has (as
parquet does), and `filters.max_top_ngram_fraction` refuses n-gram sizes below 1 and fractions outside
[0, 1] naming the field."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from kubellm.core.config import format_validation_error
from kubellm.core.errors import InputDataError
from kubellm.data_prep.config import DataPrepConfig, QualityFilters
from kubellm.data_prep.readers import read_records
from kubellm.data_prep.records import Record
from kubellm.data_prep.sources import resolve_sources
from kubellm.data_prep.stage import run

TEXT = ("Velmora is a quiet city with old stone bridges, a busy market and a harbour where the "
        "sailors sing in the evening; document {i} tells the story of its bakers and painters.")


def _read(path: Path, field: str = "text") -> list[Record]:
    [source] = resolve_sources(str(path))
    return list(read_records(source, path, field=field, max_bytes=1 << 20))


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.json"])
def test_json_file_without_the_text_field_in_any_record_fails_naming_its_keys(tmp_path: Path, name: str) -> None:
    items = [{"content": TEXT.format(i=i), "id": i} for i in range(30)]
    items[4] = {"content": "x", "id": 4, "lang": "en"}
    if name == "a.json":
        data = json.dumps(items).encode()
    else:
        data = "".join(json.dumps(x) + "\n" for x in items).encode() + b"not json\n"
    p = tmp_path / name
    p.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(InputDataError, match=rf"{name}: none of its 30 JSON object\(s\) has the field 'text' "
                                             r"\(data_prep.text_field\); the keys they have \(objects with each\): "
                                             r"'content' \(30\), 'id' \(30\), 'lang' \(1\)"):
        _read(p)
    assert [r.text for r in _read(p, field="content")][:2] == [TEXT.format(i=0), TEXT.format(i=1)]
    # the stage fails on it too, whatever max_bad_fraction, and publishes nothing
    with pytest.raises(InputDataError, match="none of its 30 JSON object"):
        run(DataPrepConfig(max_bad_fraction=1.0), {"raw": str(p)}, str(tmp_path / "out"))
    assert not list((tmp_path / "out").rglob("_manifest.json"))


def test_some_records_with_the_field_or_no_objects_are_per_record_bad_records(tmp_path: Path) -> None:
    p = tmp_path / "mixed.jsonl"
    p.write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"content": "no text"}) + "\n")
    assert [r.reason or "ok" for r in _read(p)] == ["ok", "missing_field"]
    p.write_text('{"text": "cut\n[1, 2]\n\n')  # no JSON object at all: bad records, not a field mistake
    assert [r.reason for r in _read(p)] == ["malformed_json", "not_text"]
    p.write_text("")
    assert _read(p) == []
    p.write_text(json.dumps({"text": None}) + "\n")  # the field is there, null: a bad record
    assert [r.reason for r in _read(p)] == ["missing_field"]


@pytest.mark.parametrize(("value", "where", "what"), [
    ({0: 0.2}, "max_top_ngram_fraction.0.[key]", "greater than or equal to 1"),
    ({-2: 0.2}, "max_top_ngram_fraction.-2.[key]", "greater than or equal to 1"),
    ({2: -0.1}, "max_top_ngram_fraction.2", "greater than or equal to 0"),
    ({3: 1.5}, "max_top_ngram_fraction.3", "less than or equal to 1"),
])
def test_top_ngram_fraction_refuses_n_below_1_and_fractions_outside_0_1(value: dict[int, float], where: str,
                                                                       what: str) -> None:
    with pytest.raises(ValidationError) as e:
        DataPrepConfig.model_validate({"filters": {"max_top_ngram_fraction": value}})
    msg = format_validation_error(e.value, "run-config", "data_prep")
    assert f"data_prep.filters.{where}: Input should be {what}" in msg, msg
    ok = QualityFilters(max_top_ngram_fraction={1: 0.0, 2: 1.0})
    assert ok.max_top_ngram_fraction == {1: 0.0, 2: 1.0}
