"""A shard that changes between listing and reading is refused (fan-out map and single step) rather than
published under the address of its old content, and the report's bytes balance with PII scrubbing on."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kubellm.data_prep.stage as stage
from kubellm.core.errors import InputDataError
from kubellm.data_prep.config import DataPrepConfig, PIIConfig
from kubellm.data_prep.stage import fan_out_shards, prepare_fan_out_shard, reduce_fan_out, run

TEXT = ("Velmora is a quiet city with old stone bridges, a busy market and a harbour where the "
        "sailors sing in the evening; document {i} tells the story of its bakers and painters.")


def _write(path: Path, start: int, n: int) -> None:
    path.write_text("".join(json.dumps({"text": TEXT.format(i=start + i)}) + "\n" for i in range(n)))


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    d = tmp_path / "raw"
    d.mkdir()
    _write(d / "a.jsonl", 0, 10)
    _write(d / "b.jsonl", 100, 10)
    return d


def test_fan_out_map_refuses_a_shard_changed_since_list_shards(raw: Path, tmp_path: Path) -> None:
    cfg = DataPrepConfig(validation_fraction=0.0)
    shards = fan_out_shards(str(raw), cfg, str(tmp_path / "out"), "run1")
    _write(raw / "b.jsonl", 500, 12)  # changed after list-shards listed it
    assert prepare_fan_out_shard(shards[0], cfg)["records"] == 10
    with pytest.raises(InputDataError, match=rf"{raw / 'b.jsonl'}: changed since list-shards listed it "
                                             r"\(fingerprint '.*' then, fingerprint '.*' now\)"):
        prepare_fan_out_shard(shards[1], cfg)
    (raw / "b.jsonl").unlink()
    with pytest.raises(InputDataError, match=r"b\.jsonl: no such file"):
        prepare_fan_out_shard(shards[1], cfg)


def _append_while_reading(monkeypatch: pytest.MonkeyPatch, victim: Path) -> None:
    """Make `victim` change while the map reads it (after its first record)."""
    real = stage.read_records

    def reading(source: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for i, rec in enumerate(real(source, *args, **kwargs)):
            if i == 0 and Path(source.uri) == victim:
                with open(victim, "a") as f:
                    f.write(json.dumps({"text": TEXT.format(i=999)}) + "\n")
                st = victim.stat()
                os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            yield rec

    monkeypatch.setattr(stage, "read_records", reading)


def test_fan_out_map_refuses_a_shard_that_changed_while_it_was_read(raw: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataPrepConfig(validation_fraction=0.0)
    out = tmp_path / "out"
    shards = fan_out_shards(str(raw), cfg, str(out), "run1")
    prepare_fan_out_shard(shards[0], cfg)
    _append_while_reading(monkeypatch, raw / "b.jsonl")
    with pytest.raises(InputDataError, match=r"b\.jsonl: changed since the input was listed"):
        prepare_fan_out_shard(shards[1], cfg)
    assert not (Path(shards[1]["work"]) / "shard-00001" / "stats.json").exists()  # its map output is not done
    with pytest.raises(InputDataError, match="map output .* is incomplete"):
        reduce_fan_out(shards, cfg, str(out))
    assert not list(out.rglob("_manifest.json"))


def test_single_step_refuses_an_input_that_changed_while_it_was_read(raw: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _append_while_reading(monkeypatch, raw / "a.jsonl")
    out = tmp_path / "out"
    with pytest.raises(InputDataError, match=r"a\.jsonl: changed since data prep listed the input"):
        run(DataPrepConfig(validation_fraction=0.0), {"raw": str(raw)}, str(out))
    assert not list(out.rglob("_manifest.json"))


def test_report_bytes_balance_with_pii_scrubbing(tmp_path: Path) -> None:
    d = tmp_path / "raw"
    d.mkdir()
    docs = [TEXT.format(i=i) for i in range(30)]
    docs[1] += " Write to someone.with.a.long.name@example.com or call +44 20 7946 0958 today."
    docs[2] += " Our server is at 10.0.0.1 and a@b.io answers mail."  # a@b.io (6 bytes) -> <EMAIL> (7)
    docs[3] = docs[1]  # an exact duplicate: scrubbed in the map, removed by the dedup after it
    docs[4] = "too short"  # removed by a quality filter before scrubbing
    docs[5] += " ip 192.0.2.4"
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    cfg = DataPrepConfig(validation_fraction=0.2, pii=PIIConfig(enabled=True))
    m = run(cfg, {"raw": str(d)}, str(tmp_path / "out"))
    c, rows = m.counts, m.metadata["report"]
    [pii] = [r for r in rows if r["step"] == "pii"]
    assert pii == {"step": "pii", "name": "pii_scrubbed", "documents": 0, "bytes": c["pii_bytes_removed"]}
    assert c["pii_documents"] == 4 and c["pii_bytes_removed"] > 0
    removed = [r for r in rows if r["step"] != "bad record"]
    assert c["removed_exact_duplicate"] == 1 and c["removed_min_words"] == 1
    assert c["bytes_in"] - sum(r["bytes"] for r in removed) == c["bytes_out"]
    assert c["documents_in"] - sum(r["documents"] for r in removed) == c["documents_out"]
    assert f"| pii | pii_scrubbed | 0 | {c['pii_bytes_removed']:,} |" in (m.report_markdown or "")
    # scrubbing off: no pii row, and the report balances as before
    m2 = run(DataPrepConfig(validation_fraction=0.2), {"raw": str(d)}, str(tmp_path / "out2"))
    assert not [r for r in m2.metadata["report"] if r["step"] == "pii"]
    assert m2.counts["bytes_in"] - sum(r["bytes"] for r in m2.metadata["report"]
                                       if r["step"] != "bad record") == m2.counts["bytes_out"]


def test_a_reduce_that_loses_the_race_to_a_concurrent_run_returns_its_artifact(
        raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs of the same sources and config share one work prefix (the second one's list-shards is a
    cache hit). When the first reduce publishes and deletes the prefix while the second is reading it,
    the second returns the artifact the first published instead of failing."""
    cfg = DataPrepConfig(validation_fraction=0.0)
    out = str(tmp_path / "out")
    shards = [json.loads(json.dumps(s)) for s in fan_out_shards(str(raw), cfg, out, "run1")]
    for s in shards:
        prepare_fan_out_shard(s, cfg)
    real = stage.write_splits
    winner: dict[str, Any] = {}

    def concurrent_run_finishes_first(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(stage, "write_splits", real)
        winner["manifest"] = reduce_fan_out(shards, cfg, out)  # publishes, then deletes the work prefix
        assert not Path(shards[0]["work"]).exists()
        return real(*args, **kwargs)  # the loser reads a work prefix that is gone

    monkeypatch.setattr(stage, "write_splits", concurrent_run_finishes_first)
    loser = reduce_fan_out(shards, cfg, out)
    assert loser.to_json() == winner["manifest"].to_json()


def test_a_reduce_failure_with_nothing_published_still_fails(raw: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataPrepConfig(validation_fraction=0.0)
    out = str(tmp_path / "out")
    shards = [json.loads(json.dumps(s)) for s in fan_out_shards(str(raw), cfg, out, "run1")]
    for s in shards:
        prepare_fan_out_shard(s, cfg)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(stage, "write_splits", broken)
    with pytest.raises(OSError, match="disk full"):
        reduce_fan_out(shards, cfg, out)
