"""The tokenizer stage: train byte-level BPE on the cleaned train split and encode both splits into
packed token shards.

    kubellm data-prep --input raw=.kubellm/demo/corpus --output .kubellm/artifacts
    kubellm tokenizer --input dataset=.kubellm/artifacts/data_prep/<hash> --output .kubellm/artifacts

Input `dataset`: a data-prep artifact (manifest kind `dataset`: `train/*.parquet`,
`validation/*.parquet`, column `text`). Output (manifest kind `token_shards`):

    tokenizer/            tokenizer.json, tokenizer_config.json (+ chat template), … —
                          `transformers.AutoTokenizer.from_pretrained(<prefix>/tokenizer)` loads it
    train/part-00000.tok  packed shards (`kubellm.tokenizer.shards`); each document is
    validation/part-00000.tok   `[bos] + ids + [eos]`

`metadata`: vocab_size, bos_id, eos_id, pad_id, special_tokens (token -> id), chat_template,
train_files, validation_files. `metrics`: bytes_per_token on validation (UTF-8 bytes of the text over
its tokens, bos/eos excluded) and on train. The chat format is documented in `kubellm.tokenizer.bpe`.

Corpus text is encoded as text only: a special-token string inside a document (`<|eos|>`,
`<|assistant|>`, …) becomes ordinary byte-level tokens, never the control id, so every document is
exactly `[bos] + ids + [eos]` and corpus text cannot inject role markers. The published tokenizer keeps
the normal behaviour (its chat template relies on the markers being parsed).

A null or empty `text` value is skipped, like data prep's bad records: it is not a document in the
shards or in `<split>_documents`, is counted in `<split>_empty_texts`, and the report and the log name
the first few (file and row). `counts.bpe_train_documents` / `bpe_train_bytes` say how much of the
train split BPE was trained on (all of it unless `max_train_bytes` is set).

Encoding streams parquet record batches and calls `Tokenizer.encode_batch` (`batch_size` documents
at a time, parallel inside the Rust encoder), so memory stays bounded by one batch.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from kubellm.core.errors import InputDataError, ManifestMissingError
from kubellm.core.manifest import (
    Manifest,
    content_prefix,
    fetch,
    load_manifest_ref,
    publish_dir,
    read_manifest,
)
from kubellm.tokenizer.bpe import chat_template, save_hf_tokenizer, special_tokens, train_bpe
from kubellm.tokenizer.config import TokenizerConfig
from kubellm.tokenizer.shards import TokenShardWriter

log = logging.getLogger(__name__)
SPLITS = ("train", "validation")


@dataclass
class EmptyTexts:
    """Null or empty `text` values that `iter_texts` left out: how many, and the first few as
    (file, row) with rows counted from 0 in their file."""

    count: int = 0
    examples: list[tuple[Path, int]] = field(default_factory=list)
    max_examples: int = 5

    def add(self, file: Path, row: int) -> None:
        self.count += 1
        if len(self.examples) < self.max_examples:
            self.examples.append((file, row))


def iter_texts(files: list[Path], batch_size: int = 1000, empty: EmptyTexts | None = None) -> Iterator[list[str]]:
    """Batches of `text` values from parquet files, streamed record batch by record batch. Null and
    empty values are left out of the batches; each is recorded in `empty` when one is given."""
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise InputDataError(f"{f}: not a readable parquet file ({e})") from e
        if "text" not in pf.schema_arrow.names:
            raise InputDataError(f"{f}: no `text` column (columns: {pf.schema_arrow.names})")
        kind = pf.schema_arrow.field("text").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise InputDataError(f"{f}: column `text` is {kind}, expected strings (data prep writes UTF-8 text)")
        row = 0
        batches = pf.iter_batches(batch_size=batch_size, columns=["text"])
        while True:
            try:  # a damaged data page or invalid UTF-8 past the header: name the file and where
                batch = next(batches, None)
                values = [] if batch is None else batch.column("text").to_pylist()
            except (OSError, UnicodeDecodeError, pa.ArrowException) as e:
                raise InputDataError(f"{f}: unreadable after row {row} ({type(e).__name__}: {e})") from e
            if batch is None:
                break
            if empty is not None:
                for i, t in enumerate(values):
                    if not t:
                        empty.add(f, row + i)
            row += len(values)
            yield [t for t in values if t]


@dataclass
class TrainingUse:
    """How much of the train split `_training_texts` handed to BPE training."""

    documents: int = 0
    bytes: int = 0
    first_over_limit: bool = False
    """The first document alone was over `max_train_bytes`; it was used anyway (BPE needs a text)."""


def _training_texts(files: list[Path], max_bytes: int | None, used: TrainingUse | None = None) -> Iterator[str]:
    """The train texts in order, stopping before the document that would bring the total over
    `max_bytes` UTF-8 bytes (None: all of them). If the very first document is over the limit it is
    used alone (`used.first_over_limit`), so that training always has a text."""
    used = used if used is not None else TrainingUse()
    for batch in iter_texts(files):
        for text in batch:
            size = len(text.encode("utf-8"))
            if max_bytes is not None and used.bytes + size > max_bytes:
                if used.documents == 0:
                    used.first_over_limit = True
                    log.warning("tokenizer: the first train document is %d bytes, over max_train_bytes %d; "
                                "training BPE on that document alone", size, max_bytes)
                    used.documents, used.bytes = 1, size
                    yield text
                return
            used.documents += 1
            used.bytes += size
            yield text


def corpus_encoder(tok: Tokenizer) -> Tokenizer:
    """A copy of `tok` that encodes special-token strings found in the text as ordinary text (corpus
    documents must not produce control ids); `tok` itself, which is what gets saved, is unchanged."""
    enc = Tokenizer.from_str(tok.to_str())
    enc.encode_special_tokens = True
    return enc


@contextlib.contextmanager
def _env_var(name: str, value: str | None) -> Iterator[None]:
    """Set `name` to `value` (None: leave it as it is) for the block; the old value (or its absence)
    comes back afterwards."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _encoded(tok: Tokenizer, batches: Iterator[list[str]]) -> Iterator[tuple[list[str], list[Any]]]:
    """(texts, encodings) per batch; the next batch is encoded on a worker thread (the Rust encoder
    releases the GIL) while the caller writes this one."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubellm-encode") as pool:

        def submit() -> Future[tuple[list[str], list[Any]]] | None:
            texts = next(batches, None)
            if texts is None:
                return None
            # encode_batch_fast: same ids, no character offsets (unused here)
            return pool.submit(lambda: (texts, tok.encode_batch_fast(texts, add_special_tokens=False)))

        pending = submit()
        while pending is not None:
            texts, encodings = pending.result()
            pending = submit()
            yield texts, encodings


def with_bos_eos(ids: list[list[int]], bos: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lengths): every document as [bos, *ids, eos], back to back, built without a Python
    list per document."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    out = np.empty(flat.size + 2 * len(ids), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths + 2)[:-1]]).astype(np.int64)
    is_text = np.ones(out.size, dtype=bool)
    is_text[starts] = is_text[starts + lengths + 1] = False
    out[starts], out[starts + lengths + 1], out[is_text] = bos, eos, flat
    return out, lengths + 2


def encode_split(tok: Tokenizer, files: list[Path], out_dir: Path, split: str, cfg: TokenizerConfig,
                 vocab_size: int, bos: int, eos: int) -> dict[str, Any]:
    """Encode one split into `out_dir/<split>/part-*.tok`; returns counts and bytes/token. A shard is
    closed after the document that brings it to `cfg.tokens_per_shard` tokens. Special-token strings
    in the text are encoded as text (`corpus_encoder`); null/empty texts are skipped and reported in
    `stats["empty"]` (an `EmptyTexts`)."""
    empty = EmptyTexts()
    stats: dict[str, Any] = {"documents": 0, "tokens": 0, "text_tokens": 0, "bytes": 0, "files": [],
                             "empty": empty}
    writer: TokenShardWriter | None = None
    for texts, encodings in _encoded(corpus_encoder(tok), iter_texts(files, cfg.batch_size, empty)):
        if not texts:
            continue
        tokens, lengths = with_bos_eos([e.ids for e in encodings], bos, eos)
        stats["documents"] += len(texts)
        stats["tokens"] += int(tokens.size)
        stats["text_tokens"] += int(tokens.size) - 2 * len(texts)
        stats["bytes"] += sum(len(t.encode("utf-8")) for t in texts)
        ends = np.cumsum(lengths)
        first = 0
        while first < len(lengths):
            if writer is None:
                name = f"{split}/part-{len(stats['files']):05d}.tok"
                writer = TokenShardWriter(out_dir / name, vocab_size)
                stats["files"].append(name)
            done = int(ends[first - 1]) if first else 0
            # the first document (from `first` on) that fills this shard, or the batch's end
            full = int(np.searchsorted(ends[first:] - done + writer.token_count, cfg.tokens_per_shard))
            last = min(first + full + 1, len(lengths))
            writer.add_packed(tokens[done : int(ends[last - 1])], lengths[first:last])
            if writer.token_count >= cfg.tokens_per_shard:
                writer.close()
                writer = None
            first = last
    if writer is not None:
        writer.close()
    stats["bytes_per_token"] = stats["bytes"] / stats["text_tokens"] if stats["text_tokens"] else 0.0
    return stats


def run(config: TokenizerConfig, inputs: Mapping[str, str], output: str) -> Manifest:
    """Stage entry point: input `dataset` (a data-prep artifact), output storage root."""
    dataset = load_manifest_ref(inputs["dataset"])
    if dataset.kind != "dataset":
        raise InputDataError(f"{inputs['dataset']}: artifact kind {dataset.kind!r}, expected 'dataset' "
                             "(the output of `kubellm data-prep`)")
    cfg_hash = config.config_hash()
    parents = {"dataset": dataset.digest()}
    prefix = content_prefix(output, "tokenizer", cfg_hash, parents)
    try:
        existing = read_manifest(prefix)
        log.info("tokenizer: %s already committed for this dataset and config; reusing it", prefix)
        log.info("\n%s", existing.report_markdown or "")
        return existing
    except ManifestMissingError:
        pass
    # read when the Rust encoder's thread pool starts; set for this stage only
    threads = str(config.num_threads) if config.num_threads else None
    with _env_var("RAYON_NUM_THREADS", threads), tempfile.TemporaryDirectory(prefix="kubellm-tok-") as tmp:
        data_dir = Path(tmp) / "data"
        wanted = [f.path for f in dataset.files if f.path.endswith(".parquet")
                  and f.path.split("/", 1)[0] in SPLITS]
        fetch(dataset, data_dir, paths=wanted)
        split_files = {s: sorted(data_dir / p for p in wanted if p.startswith(f"{s}/")) for s in SPLITS}
        if not split_files["train"]:
            raise InputDataError(f"{dataset.uri}: the dataset has no train/*.parquet files to train on")

        log.info("tokenizer: training byte-level BPE (vocab %d) on %d train file(s)", config.vocab_size,
                 len(split_files["train"]))
        used = TrainingUse()
        tok = train_bpe(_training_texts(split_files["train"], config.max_train_bytes, used), config,
                        length=dataset.counts.get("train_documents"))
        if not used.documents:
            raise InputDataError(f"{dataset.uri}: every `text` value in train/*.parquet is null or empty: "
                                 "expected at least one non-empty train document to train BPE on")
        vocab_size = tok.get_vocab_size()
        specials = {t: tok.token_to_id(t) for t in special_tokens(config)}
        bos, eos, pad = specials[config.bos_token], specials[config.eos_token], specials[config.pad_token]
        out_dir = Path(tmp) / "out"
        save_hf_tokenizer(tok, config, out_dir / "tokenizer")

        stats = {s: encode_split(tok, split_files[s], out_dir, s, config, vocab_size, bos, eos) for s in SPLITS}
        bpt_val = stats["validation"]["bytes_per_token"]
        counts = {"vocab_size": vocab_size, "bpe_train_documents": used.documents, "bpe_train_bytes": used.bytes}
        for s in SPLITS:
            counts[f"{s}_documents"] = stats[s]["documents"]
            counts[f"{s}_tokens"] = stats[s]["tokens"]
            counts[f"{s}_bytes"] = stats[s]["bytes"]
            counts[f"{s}_empty_texts"] = stats[s]["empty"].count
        notes = _empty_text_notes(stats, data_dir)
        if config.max_train_bytes is not None:
            notes.append(f"BPE trained on {used.documents} train document(s), {used.bytes:,} bytes "
                         f"(max_train_bytes {config.max_train_bytes:,})"
                         + ("; the first document alone is over the limit and was used anyway."
                            if used.first_over_limit else "."))
        metrics = {"bytes_per_token_train": stats["train"]["bytes_per_token"]}
        if stats["validation"]["documents"]:
            metrics["bytes_per_token"] = bpt_val
        else:  # data prep made no validation split (validation_fraction 0): nothing to report
            log.warning("tokenizer: the dataset has no validation documents; bytes/token is reported on train only")
        md = "\n".join([
            "## Tokenizer report", "",
            f"Byte-level BPE, vocab {vocab_size} (requested {config.vocab_size}), min frequency "
            f"{config.min_frequency}; special tokens {', '.join(f'`{t}`={i}' for t, i in specials.items())}.", "",
            "| split | documents | tokens | bytes | bytes/token |", "|---|---:|---:|---:|---:|",
            *[f"| {s} | {stats[s]['documents']} | {stats[s]['tokens']:,} | {stats[s]['bytes']:,} | "
              f"{stats[s]['bytes_per_token']:.3f} |" for s in SPLITS],
            "", (f"**Validation bytes/token: {bpt_val:.3f}**" if "bytes_per_token" in metrics
                 else "**Validation bytes/token: n/a (the dataset has no validation documents)**"), "",
            *[line for note in notes for line in (note, "")],
        ])
        metadata = {"vocab_size": vocab_size, "bos_id": bos, "eos_id": eos, "pad_id": pad,
                    "special_tokens": specials, "tokenizer_dir": "tokenizer",
                    "chat_template": chat_template(config), "dtype": "uint16" if vocab_size <= 65536 else "uint32",
                    "train_files": stats["train"]["files"], "validation_files": stats["validation"]["files"],
                    "document_format": "[bos] + ids + [eos]"}
        manifest = publish_dir(out_dir, prefix, kind="token_shards", counts=counts, metrics=metrics,
                               config_hash=cfg_hash, parents=parents, metadata=metadata, report_markdown=md)
    log.info("\n%s", md)
    log.info("tokenizer: published %s (validation bytes/token %.3f)", manifest.uri, bpt_val)
    return manifest


def _empty_text_notes(stats: Mapping[str, Mapping[str, Any]], data_dir: Path) -> list[str]:
    """One report line per split that had null/empty `text` values, naming the first few (dataset
    file and row); each is also logged as a warning."""
    notes = []
    for s in SPLITS:
        empty: EmptyTexts = stats[s]["empty"]
        if not empty.count:
            continue
        where = ", ".join(f"{f.relative_to(data_dir).as_posix()} row {row}" for f, row in empty.examples)
        more = ", …" if empty.count > len(empty.examples) else ""
        note = (f"Skipped {empty.count} null/empty `text` value(s) in the {s} split (not counted as documents): "
                f"{where}{more}.")
        log.warning("tokenizer: %s", note)
        notes.append(note)
    return notes
