"""The data-prep stage: raw text -> cleaned, filtered, deduplicated parquet shards + a filter report.

    kubellm demo-world --output .kubellm/demo
    kubellm data-prep --input raw=.kubellm/demo/corpus --output .kubellm/artifacts
    kubellm data-prep --input raw=s3://bucket/raw/,./extra.jsonl.gz --output s3://bucket/kubellm

Output (manifest kind `dataset`, under `content_prefix(output, "data_prep", ...)`):
`train/part-00000.parquet`, `validation/part-00000.parquet`, … — one column `text`. The manifest's
`counts` and `metadata["report"]` (and the Markdown table in `report_markdown`) say how many documents
and bytes each step removed: bad records by kind, each quality filter, PII scrubbing (bytes only; it
removes no document) and exact and near duplicates, so that `bytes_in` minus every row but the bad
records' is `bytes_out`. Input files a scan skipped (unknown format) are named in `skipped_inputs`.

Map / reduce — `run()` calls these in order on one machine; a pipeline can fan the map out over pods
(`dsl.ParallelFor` over `list_sources(raw)`) and run the reduce and the write once:

1. `list_sources(raw) -> list[Source]` — the input shards (one per file/object/save_to_disk
   directory/hub dataset), each with the fingerprint the artifact's address is computed from: a shard
   whose fingerprint changed by the time it was read fails the stage (run() re-lists the input after
   the map; a fanned-out map compares before and after reading its shard).
2. `prepare_shard(source, index, config, work) -> dict` (map, one input shard): streams the records
   (`kubellm.data_prep.sources` says what names the shards, `kubellm.data_prep.readers` how each
   format is read and why), skips and names bad records, NFC-normalises, applies the quality
   filters and optional PII scrubbing, and writes under `work/shard-<index>/`: `docs.parquet` (text + exact-dedup key), `minhash.bin` (uint32 MinHash
   signatures, one row per doc) and `stats.json`. Memory: one record plus one write batch (at most
   4096 documents or 64 MiB of text).
3. `global_dedup(work, config, n_shards) -> dict` (reduce): checks the bad-record fraction (raises
   `InputDataError` naming the first bad records when it exceeds `max_bad_fraction`), then walks the
   shards in order keeping only the exact-dedup keys and a datasketch `MinHashLSH` index in memory;
   the first occurrence wins. Writes `work/shard-<index>/keep.npy` and `work/dedup.json`.
4. `write_splits(work, config, n_shards, out_dir) -> dict`: streams the kept documents into the
   train/validation parquet shards (split by a hash of the text), `docs_per_shard` documents per
   shard, written in row groups of at most 64 MiB of text (memory does not grow with document size).
5. `publish(...)` commits the artifact with the report.

`work` is a storage URI (local dir or `s3://…`): each step reads and writes it through
`kubellm.core.storage`, so the steps can run in different pods.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import tempfile
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kubellm.core.errors import InputDataError, KubellmError, ManifestMissingError
from kubellm.core.manifest import Manifest, content_prefix, publish_dir, read_manifest, stable_hash
from kubellm.core.storage import is_s3, join, local_path, storage_for
from kubellm.data_prep import filters as F
from kubellm.data_prep.config import EXECUTION_FIELDS, DataPrepConfig
from kubellm.data_prep.readers import read_records
from kubellm.data_prep.sources import (
    HUB_SCHEME,
    Source,
    check_unchanged,
    current_fingerprint,
    resolve_uri,
    scan_sources,
    stage_local,
)

log = logging.getLogger(__name__)

# Bad-record kinds: each is skipped and counted. A file that cannot be read to its end (truncated gzip,
# corrupt parquet) is not among them: it raises InputDataError, since what it lost cannot be counted.
BAD_KINDS = ("invalid_utf8", "lone_surrogate", "nul_byte", "empty", "too_large", "malformed_json",
             "missing_field", "not_text")
MAX_EXAMPLES = 50
MAX_SKIPPED_NAMES = 50  # input files a scan skipped (unknown format), named in the manifest
_BATCH = 4096
_BATCH_BYTES = 64 << 20  # a write batch ends at _BATCH documents or this much text, whichever comes first
#: MinHashLSH's (false-positive, false-negative) weights when it picks bands and rows: recall-weighted,
#: because every candidate is then checked against the kept document's signature (see global_dedup)
LSH_WEIGHTS = (0.1, 0.9)


def list_sources(raw: str) -> list[Source]:
    """The input shards named by a raw input (comma-separated files, dirs, globs, s3 prefixes, hf:)."""
    return scan_sources(raw).sources


def _shard_dir(index: int) -> str:
    return f"shard-{index:05d}"


class _WorkDir:
    """A local view of a work URI: write locally, then push (S3) — or write in place (local)."""

    def __init__(self, work: str) -> None:
        self.work = work
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if is_s3(work):
            self._tmp = tempfile.TemporaryDirectory(prefix="kubellm-dataprep-")
            self.local = Path(self._tmp.name)
        else:
            self.local = local_path(work)  # a plain path or file:// URI (a pod's cwd must not matter)
            self.local.mkdir(parents=True, exist_ok=True)

    def get(self, rel: str) -> Path:
        p = self.local / rel
        if self._tmp is not None and not p.exists():
            storage_for(self.work).download(join(self.work, rel), p)
        return p

    def put(self, rel: str) -> None:
        if self._tmp is not None:
            storage_for(self.work).upload(self.local / rel, join(self.work, rel))

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _add(table: dict[str, dict[str, int]], name: str, nbytes: int) -> None:
    row = table.setdefault(name, {"documents": 0, "bytes": 0})
    row["documents"] += 1
    row["bytes"] += nbytes


def prepare_shard(source: Source | str, index: int, config: DataPrepConfig, work: str, *,
                  recheck: bool = False) -> dict[str, Any]:
    """Map step for one input shard (see the module docstring). Returns its stats dict.

    `source` is a `Source` or the URI of one shard (`Source.uri`, e.g. a ParallelFor item). With
    `recheck`, the shard's fingerprint is compared with `source.fingerprint` after it was read and
    before anything is written under `work`: InputDataError naming the file when it changed."""
    if isinstance(source, str):
        found = resolve_uri(source)
        if len(found) != 1:
            raise InputDataError(f"{source}: names {len(found)} shards; prepare_shard takes one "
                                 "(use list_sources() to split the input)")
        source = found[0]
    wd = _WorkDir(work)
    rel = _shard_dir(index)
    (wd.local / rel).mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {"source": source.uri, "index": index, "records": 0, "documents_in": 0,
                             "bytes_in": 0, "bad": {}, "bad_examples": [], "filtered": {},
                             "pii": {"documents": 0, "replacements": 0, "bytes_removed": 0},
                             "kept": 0, "kept_bytes": 0}
    schema = pa.schema([("text", pa.string()), ("key", pa.binary(16))])
    sig_dtype = F.signature_dtype(config.dedup)
    texts: list[str] = []
    keys: list[bytes] = []
    batch_bytes = 0
    n_logged = 0
    with tempfile.TemporaryDirectory(prefix="kubellm-raw-") as tmp:
        local = None if source.format == "hub" else stage_local(source, Path(tmp))
        with pq.ParquetWriter(wd.local / rel / "docs.parquet", schema) as writer, \
                open(wd.local / rel / "minhash.bin", "wb") as sig_file:

            def flush() -> None:
                nonlocal batch_bytes
                batch_bytes = 0
                if texts:
                    writer.write_table(pa.table({"text": texts, "key": keys}, schema=schema))
                    sigs = (F.minhash_signatures(texts, config.dedup) if config.dedup.near  # the whole batch at once
                            else np.zeros((len(texts), config.dedup.num_perm), sig_dtype))
                    sig_file.write(sigs.astype(sig_dtype).tobytes())
                    texts.clear()
                    keys.clear()

            for rec in read_records(source, local, field=config.text_field, max_bytes=config.max_doc_bytes,
                                    sample_by=config.text_sample_by, hub_split=config.hub_split):
                stats["records"] += 1
                if rec.reason is not None:
                    _add(stats["bad"], rec.reason, rec.nbytes)
                    if len(stats["bad_examples"]) < MAX_EXAMPLES:
                        stats["bad_examples"].append({"where": rec.where, "reason": rec.reason,
                                                      "detail": rec.detail})
                    if n_logged < 20:
                        log.warning("skipping bad record %s: %s %s", rec.where, rec.reason, rec.detail)
                        n_logged += 1
                    continue
                assert rec.text is not None
                text = F.normalize(rec.text, config.unicode_form)
                nbytes = len(text.encode("utf-8"))
                stats["documents_in"] += 1
                stats["bytes_in"] += nbytes
                reason = F.quality_reason(text, config.filters)
                if reason is not None:
                    _add(stats["filtered"], reason, nbytes)
                    continue
                if config.pii.enabled:
                    text, k = F.scrub_pii(text, config.pii)
                    scrubbed = len(text.encode("utf-8"))
                    stats["pii"]["bytes_removed"] += nbytes - scrubbed  # < 0 where placeholders are longer
                    nbytes = scrubbed
                    if k:
                        stats["pii"]["documents"] += 1
                        stats["pii"]["replacements"] += k
                stats["kept"] += 1
                stats["kept_bytes"] += nbytes
                texts.append(text)
                keys.append(F.dedup_key(text))
                batch_bytes += nbytes
                if len(texts) >= min(_BATCH, config.docs_per_shard) or batch_bytes >= _BATCH_BYTES:
                    flush()
            flush()
            if recheck:
                check_unchanged(source, source.fingerprint, "the input was listed")
    if n_logged >= 20:
        log.warning("%s: %d bad records in all (first 20 logged)", source.uri,
                    sum(v["documents"] for v in stats["bad"].values()))
    (wd.local / rel / "stats.json").write_text(json.dumps(stats, indent=1))
    for name in ("docs.parquet", "minhash.bin", "stats.json"):
        wd.put(f"{rel}/{name}")
    wd.close()
    log.info("shard %d (%s): %d records, %d kept after filters", index, source.uri, stats["records"],
             stats["kept"])
    return stats


def _load_stats(wd: _WorkDir, n_shards: int) -> list[dict[str, Any]]:
    return [json.loads(wd.get(f"{_shard_dir(i)}/stats.json").read_text()) for i in range(n_shards)]


def check_bad_fraction(stats: list[dict[str, Any]], config: DataPrepConfig) -> None:
    """Raise InputDataError naming the bad records when their fraction exceeds `max_bad_fraction`."""
    records = sum(s["records"] for s in stats)
    bad = sum(v["documents"] for s in stats for v in s["bad"].values())
    if records and bad / records > config.max_bad_fraction:
        examples = [e for s in stats for e in s["bad_examples"]][:10]
        listing = "\n".join(f"  - {e['where']}: {e['reason']} {e['detail']}".rstrip() for e in examples)
        raise InputDataError(
            f"{bad} of {records} input records ({bad / records:.1%}) are bad, more than "
            f"data_prep.max_bad_fraction={config.max_bad_fraction}; first ones:\n{listing}\n"
            "Fix the inputs, or raise data_prep.max_bad_fraction to skip them."
        )


def global_dedup(work: str, config: DataPrepConfig, n_shards: int, wd: _WorkDir | None = None) -> dict[str, Any]:
    """Reduce step: bad-fraction check, then global exact + MinHash-LSH near dedup (first wins)."""
    from datasketch import LeanMinHash, MinHashLSH

    own = wd is None  # a caller's work dir (shared with write_splits) keeps what it fetched
    wd = wd or _WorkDir(work)
    stats = _load_stats(wd, n_shards)
    check_bad_fraction(stats, config)
    d = config.dedup
    # Recall-weighted banding (a missed duplicate costs 9× a false candidate), then every candidate is
    # verified against the kept document's stored signature (estimated Jaccard ≥ threshold), so precision
    # stays that of the threshold. Equal weights catch only ~80% of pairs at Jaccard 0.87 with 128
    # permutations; these catch ~99% (bench/bench_dedup.py).
    lsh = MinHashLSH(threshold=d.threshold, num_perm=d.num_perm, weights=LSH_WEIGHTS) if d.near else None
    shard_sigs: list[np.ndarray] = []  # memmaps of the shards walked so far, for candidate checks
    seen: set[bytes] = set()
    removed: dict[str, dict[str, int]] = {}
    sig_dtype = F.signature_dtype(d)
    scheme = F.signature_scheme(d)
    for i in range(n_shards):
        rel = _shard_dir(i)
        pf = pq.ParquetFile(wd.get(f"{rel}/docs.parquet"))
        n = pf.metadata.num_rows
        sig_path = wd.get(f"{rel}/minhash.bin")
        sigs = (np.memmap(sig_path, dtype=sig_dtype, mode="r", shape=(n, d.num_perm)) if n
                else np.zeros((0, d.num_perm), sig_dtype))
        shard_sigs.append(sigs)
        keep = np.zeros(n, dtype=bool)
        row = 0
        for batch in pf.iter_batches(batch_size=_BATCH, columns=["key", "text"]):
            keys = batch.column("key").to_pylist()
            lens = pc.binary_length(batch.column("text")).to_pylist()  # UTF-8 bytes, no Python strings
            for key, nbytes in zip(keys, lens, strict=True):
                if d.exact and key in seen:
                    _add(removed, "exact_duplicate", nbytes)
                elif lsh is not None:
                    sig = np.asarray(sigs[row])
                    m = LeanMinHash(seed=d.seed, hashvalues=sig, scheme=scheme)
                    if any(np.mean(shard_sigs[j][r] == sig) >= d.threshold
                           for j, r in (map(int, str(c).split(":")) for c in lsh.query(m))):
                        _add(removed, "near_duplicate", nbytes)
                    else:
                        lsh.insert(f"{i}:{row}", m, check_duplication=False)
                        keep[row] = True
                else:
                    keep[row] = True
                if d.exact:
                    seen.add(key)
                row += 1
        np.save(wd.local / rel / "keep.npy", keep)
        wd.put(f"{rel}/keep.npy")
    result = {"removed": removed}
    (wd.local / "dedup.json").write_text(json.dumps(result))
    wd.put("dedup.json")
    if own:
        wd.close()
    return result


def write_splits(work: str, config: DataPrepConfig, n_shards: int, out_dir: Path,
                 wd: _WorkDir | None = None) -> dict[str, Any]:
    """Stream the kept documents into `out_dir/{train,validation}/part-*.parquet` (`wd`: a work dir that
    already holds the shards, e.g. global_dedup's: an S3 work prefix is then not downloaded twice)."""
    own = wd is None
    wd = wd or _WorkDir(work)
    schema = pa.schema([("text", pa.string())])
    counts: dict[str, dict[str, Any]] = {s: {"documents": 0, "bytes": 0, "files": []}
                                         for s in ("train", "validation")}
    buffers: dict[str, list[str]] = {"train": [], "validation": []}
    buffered = {"train": 0, "validation": 0}  # bytes of text in the buffer
    in_part = {"train": 0, "validation": 0}  # documents in the open part
    writers: dict[str, pq.ParquetWriter] = {}

    def flush(split: str, end_part: bool) -> None:
        if buffers[split]:
            if split not in writers:
                name = f"{split}/part-{len(counts[split]['files']):05d}.parquet"
                (out_dir / split).mkdir(parents=True, exist_ok=True)
                writers[split] = pq.ParquetWriter(out_dir / name, schema)
                counts[split]["files"].append(name)
            writers[split].write_table(pa.table({"text": buffers[split]}, schema=schema))
            buffers[split], buffered[split] = [], 0
        if end_part and split in writers:
            writers.pop(split).close()
            in_part[split] = 0

    try:
        for i in range(n_shards):
            rel = _shard_dir(i)
            keep = np.load(wd.get(f"{rel}/keep.npy"), allow_pickle=False)
            row = 0
            for batch in pq.ParquetFile(wd.get(f"{rel}/docs.parquet")).iter_batches(batch_size=_BATCH,
                                                                                   columns=["text"]):
                for text in batch.column("text").to_pylist():
                    if keep[row]:
                        split = F.split_of(text, config.validation_fraction)
                        nbytes = len(text.encode("utf-8"))
                        buffers[split].append(text)
                        counts[split]["documents"] += 1
                        counts[split]["bytes"] += nbytes
                        buffered[split] += nbytes
                        in_part[split] += 1
                        if in_part[split] >= config.docs_per_shard:
                            flush(split, end_part=True)
                        elif buffered[split] >= _BATCH_BYTES:
                            flush(split, end_part=False)  # a row group now; the part goes on
                    row += 1
        for split in buffers:
            flush(split, end_part=True)
    finally:
        for w in writers.values():  # after an error: the scratch dir is discarded, but not with open files
            w.close()
    if own:
        wd.close()
    return counts


def build_report(sources: list[Source], stats: list[dict[str, Any]], dedup: dict[str, Any],
                 splits: dict[str, Any], skipped: list[str] | None = None, n_skipped: int | None = None
                 ) -> tuple[dict[str, int], list[dict[str, Any]], str]:
    """(counts, report rows, Markdown) from the map, reduce and write results.

    The rows balance: `bytes_in` minus the bytes of every quality-filter, PII and dedup row is
    `bytes_out` (documents likewise; the PII row removes no document, and its bytes are what scrubbing
    took out, negative where the placeholders are longer than what they replace). Bad records are
    not part of `bytes_in`. `skipped`: input files the scan left out (unknown format), the first
    `n_skipped` of them when there were more."""
    skipped = skipped or []
    n_skipped = len(skipped) if n_skipped is None else n_skipped
    rows: list[dict[str, Any]] = []
    merged: dict[str, dict[str, int]] = {}
    for s in stats:
        for table in (s["bad"], s["filtered"]):
            for name, v in table.items():
                m = merged.setdefault(name, {"documents": 0, "bytes": 0})
                m["documents"] += v["documents"]
                m["bytes"] += v["bytes"]
    order = ([(k, "bad record") for k in BAD_KINDS] + [(k, "quality filter") for k in F.FILTER_NAMES])
    for name, step in order:
        v = merged.get(name, {"documents": 0, "bytes": 0})
        rows.append({"step": step, "name": name, **v})
    pii_docs = sum(s["pii"]["documents"] for s in stats)
    pii_bytes = sum(s["pii"].get("bytes_removed", 0) for s in stats)
    if pii_docs or pii_bytes:  # measured after scrubbing from here on
        rows.append({"step": "pii", "name": "pii_scrubbed", "documents": 0, "bytes": pii_bytes})
    for name in ("exact_duplicate", "near_duplicate"):
        v = dedup["removed"].get(name, {"documents": 0, "bytes": 0})
        rows.append({"step": "dedup", "name": name, **v})
    records = sum(s["records"] for s in stats)
    bad = sum(v["documents"] for s in stats for v in s["bad"].values())
    docs_in = sum(s["documents_in"] for s in stats)
    bytes_in = sum(s["bytes_in"] for s in stats)
    out_docs = splits["train"]["documents"] + splits["validation"]["documents"]
    out_bytes = splits["train"]["bytes"] + splits["validation"]["bytes"]
    counts = {"sources": len(sources), "records": records, "bad_records": bad, "documents_in": docs_in,
              "bytes_in": bytes_in, "documents_out": out_docs, "bytes_out": out_bytes,
              "train_documents": splits["train"]["documents"], "train_bytes": splits["train"]["bytes"],
              "validation_documents": splits["validation"]["documents"],
              "validation_bytes": splits["validation"]["bytes"],
              "pii_documents": pii_docs,
              "pii_replacements": sum(s["pii"]["replacements"] for s in stats),
              "pii_bytes_removed": pii_bytes, "skipped_inputs": n_skipped}
    for r in rows:
        if r["step"] != "pii":  # counted as pii_bytes_removed: scrubbing removes no document
            counts[f"removed_{r['name']}"] = r["documents"]
            counts[f"removed_bytes_{r['name']}"] = r["bytes"]
    md = ["## Data prep report", "",
          f"{len(sources)} source shard(s), {records} records read, {bad} bad, {docs_in} documents "
          f"({bytes_in:,} bytes) after decoding; **{out_docs} documents ({out_bytes:,} bytes) kept**: "
          f"train {splits['train']['documents']}, validation {splits['validation']['documents']}.", "",
          "| step | filter | documents removed | bytes removed |", "|---|---|---:|---:|"]
    md += [f"| {r['step']} | {r['name']} | {r['documents']} | {r['bytes']:,} |" for r in rows
           if r["documents"] or r["step"] != "bad record"]
    if counts["pii_documents"]:
        md += ["", f"PII scrubbed: {counts['pii_replacements']} replacements in "
                   f"{counts['pii_documents']} documents ({pii_bytes:,} bytes fewer; the pii row)."]
    if n_skipped:
        shown = ", ".join(f"`{n}`" for n in skipped[:20]) + (", ..." if n_skipped > min(20, len(skipped)) else "")
        md += ["", f"**{n_skipped} input file(s) skipped**, no reader for their format: {shown}."]
    examples = [e for s in stats for e in s["bad_examples"]]
    if examples:
        md += ["", "Bad records (first 20):", ""]
        md += [f"- `{e['where']}`: {e['reason']} {e['detail']}".rstrip() for e in examples[:20]]
    return counts, rows, "\n".join(md) + "\n"


def _finish(sources: list[str], stats: list[dict[str, Any]], config: DataPrepConfig, work: str, raw: str,
            tmp: Path, prefix: str, parents: dict[str, str], skipped: list[str],
            n_skipped: int | None = None) -> Manifest:
    """Reduce + write + publish, after the map wrote every shard under `work` (run() and the fan-out)."""
    cfg_hash = config.config_hash()
    wd = _WorkDir(work)  # one fetch of each shard for the reduce and the write (an S3 work prefix)
    try:
        dedup = global_dedup(work, config, len(sources), wd)
        out_dir = tmp / "out"
        splits = write_splits(work, config, len(sources), out_dir, wd)
    finally:
        wd.close()
    counts, rows, md = build_report(sources, stats, dedup, splits, skipped[:MAX_SKIPPED_NAMES],  # type: ignore[arg-type]
                                    len(skipped) if n_skipped is None else n_skipped)
    if counts["documents_out"] == 0:
        raise InputDataError(f"{raw}: no document survived decoding, filters and dedup:\n{md}")
    metadata = {"text_field": "text", "report": rows,
                "bad_records": [e for s in stats for e in s["bad_examples"]][:200],
                "sources": list(sources),
                "skipped_inputs": skipped[:MAX_SKIPPED_NAMES],
                "train_files": splits["train"]["files"],
                "validation_files": splits["validation"]["files"],
                "config": config.model_dump(mode="json", exclude=set(EXECUTION_FIELDS))}
    manifest = publish_dir(out_dir, prefix, kind="dataset", counts=counts, config_hash=cfg_hash,
                           parents=parents, metadata=metadata, report_markdown=md)
    log.info("\n%s", md)
    log.info("data prep: %d -> %d documents, published %s", counts["documents_in"], counts["documents_out"],
             manifest.uri)
    return manifest


def _existing(prefix: str) -> Manifest | None:
    try:
        existing = read_manifest(prefix)
    except ManifestMissingError:
        return None
    log.info("data prep: %s already committed for these sources and config; reusing it", prefix)
    log.info("\n%s", existing.report_markdown or "")
    return existing


def _check_sources_unchanged(raw: str, sources: list[Source]) -> None:
    """After the map: every shard still has the fingerprint the artifact's address was computed from
    (one listing of the input, not one per shard); InputDataError naming the first changed file."""
    # a hub dataset is read at the commit it was pinned to when listed: nothing to re-ask
    files = [s for s in sources if s.format != "hub"]
    if not files:
        return
    try:
        now = {s.uri: s.fingerprint for s in scan_sources(raw, warn=False).sources}
    except InputDataError:  # an item is gone: name the first shard that went with it
        now = {s.uri: current_fingerprint(s) for s in files}
    for s in files:
        if now.get(s.uri) != s.fingerprint:
            check_unchanged(s, s.fingerprint, "data prep listed the input", now=now.get(s.uri))


def run(config: DataPrepConfig, inputs: Mapping[str, str], output: str) -> Manifest:
    """Stage entry point: input `raw` (see `kubellm.data_prep.sources`), output storage root."""
    sources, skipped = scan_sources(inputs["raw"])
    parents = {"raw": stable_hash([s.fingerprint for s in sources])}
    prefix = content_prefix(output, "data_prep", config.config_hash(), parents)
    existing = _existing(prefix)
    if existing is not None:
        return existing
    log.info("data prep: %d source shard(s) -> %s", len(sources), prefix)
    with tempfile.TemporaryDirectory(prefix="kubellm-dataprep-") as tmp:
        work = str(Path(tmp) / "work")
        if config.num_proc > 1 and len(sources) > 1:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=config.num_proc, mp_context=ctx) as pool:
                try:
                    stats = list(pool.map(prepare_shard, sources, range(len(sources)),
                                          [config] * len(sources), [work] * len(sources)))
                except BaseException:  # the first failure ends the stage now, not after every queued shard
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        else:
            stats = [prepare_shard(s, i, config, work) for i, s in enumerate(sources)]
        _check_sources_unchanged(inputs["raw"], sources)
        return _finish([s.uri for s in sources], stats, config, work, inputs["raw"], Path(tmp), prefix, parents,
                       skipped)


# --- Pipeline fan-out (kubellm.pipelines: list-shards -> ParallelFor prepare-shard -> dedup-reduce) ---
# JSON-friendly wrappers around the map/reduce functions above; `run()` is the same work in one process.

def fan_out_shards(raw: str, config: DataPrepConfig, output: str, run_key: str) -> list[dict[str, Any]]:
    """The ParallelFor items: one `{"index", "uri", "fingerprint", "work", "done"}` per input shard.

    `work` is a run-scoped prefix under the storage root (`<output>/_work/data_prep/<run_key>`) that
    every pod reads and writes through kubellm.core.storage; `done` is true when the artifact for these
    sources and config is already committed (the map then skips, the reduce returns it). When the scan
    skipped files of unknown format, item 0 also carries `skipped_inputs`: `{"count", "names"}` (the
    first MAX_SKIPPED_NAMES), for the reduce's manifest and report."""
    sources, skipped = scan_sources(raw)
    parents = {"raw": stable_hash([s.fingerprint for s in sources])}
    done = _existing(content_prefix(output, "data_prep", config.config_hash(), parents)) is not None
    work = join(output, "_work", "data_prep", run_key)
    items: list[dict[str, Any]] = [{"index": i, "uri": s.uri, "fingerprint": s.fingerprint, "work": work,
                                    "done": done} for i, s in enumerate(sources)]
    if skipped:
        items[0]["skipped_inputs"] = {"count": len(skipped), "names": skipped[:MAX_SKIPPED_NAMES]}
    return items


def prepare_fan_out_shard(shard: Mapping[str, Any], config: DataPrepConfig) -> dict[str, Any]:
    """Map step for one `fan_out_shards` item; returns a short summary (the stats stay under `work`).

    The shard must still be what list-shards listed: its fingerprint is compared with the item's before
    it is read and again after (InputDataError naming the file when it changed), since the artifact is
    published under an address computed from the listed fingerprints."""
    if shard.get("done"):
        return {"index": shard["index"], "skipped": True}
    uri, recorded = str(shard["uri"]), str(shard["fingerprint"])
    # a hub dataset is read at the commit list-shards pinned (its fingerprint); asking the hub again
    # could only answer a newer commit, or nothing from a pod without hub access
    found = [Source(uri, "hub", recorded)] if uri.startswith(HUB_SCHEME) else resolve_uri(uri)
    if len(found) != 1:
        raise InputDataError(f"{uri}: names {len(found)} shards now; list-shards listed it as one (the input "
                             "changed since; re-run the pipeline so that list-shards lists it again)")
    check_unchanged(found[0], recorded, "list-shards listed it", now=found[0].fingerprint)
    stats = prepare_shard(found[0], int(shard["index"]), config, str(shard["work"]), recheck=True)
    return {"index": shard["index"], "records": stats["records"], "kept": stats["kept"]}


def reduce_fan_out(shards: list[Mapping[str, Any]], config: DataPrepConfig, output: str) -> Manifest:
    """Reduce step: global exact + near dedup over every shard's signatures, the deterministic split,
    parquet shards and the report, published where `run()` would publish the same sources and config.
    Deletes the run's work prefix afterwards (it is scratch; a retried reduce finds the artifact). A
    reduce whose work prefix a concurrent run of the same sources and config deleted mid-read returns
    the artifact that run published."""
    shards = sorted(shards, key=lambda s: int(s["index"]))
    if [int(s["index"]) for s in shards] != list(range(len(shards))) or not shards:
        raise InputDataError(f"dedup-reduce: expected shards 0..n-1 from list-shards, got indexes "
                             f"{[s['index'] for s in shards]}")
    parents = {"raw": stable_hash([s["fingerprint"] for s in shards])}
    prefix = content_prefix(output, "data_prep", config.config_hash(), parents)
    existing = _existing(prefix)
    if existing is not None:
        return existing
    work = str(shards[0]["work"])
    wd = _WorkDir(work)
    try:
        stats = _load_stats(wd, len(shards))
    except (OSError, KubellmError) as e:
        raise InputDataError(f"dedup-reduce: the map output under {work} is incomplete ({e}); re-run the "
                             "pipeline (with caching off if the prepare-shard steps were cached)") from e
    finally:
        wd.close()
    skipped = shards[0].get("skipped_inputs") or {"count": 0, "names": []}
    try:
        with tempfile.TemporaryDirectory(prefix="kubellm-dataprep-") as tmp:
            manifest = _finish([str(s["uri"]) for s in shards], stats, config, work,
                               ",".join(str(s["uri"]) for s in shards), Path(tmp), prefix, parents,
                               list(skipped["names"]), int(skipped["count"]))
    except (OSError, KubellmError) as e:
        # Two runs of the same sources and config share this work prefix (the second one's cached
        # list-shards gives it the first one's): the first reduce may have published the artifact and
        # deleted the prefix while this one read it. That artifact is the one this reduce would publish.
        existing = _existing(prefix)
        if existing is None:
            raise
        log.warning("dedup-reduce: reading %s failed (%s: %s), but a concurrent run of the same sources and "
                    "config has published the artifact meanwhile; using it", work, type(e).__name__, e)
        return existing
    _delete_prefix(work)
    return manifest


def _delete_prefix(prefix: str) -> None:
    if is_s3(prefix):
        st = storage_for(prefix)
        for obj in st.list(prefix):
            st.delete(obj.uri)
    else:
        shutil.rmtree(local_path(prefix), ignore_errors=True)
