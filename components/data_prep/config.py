"""Data-prep stage config (the `data_prep:` section of the run-config).

The quality-filter defaults follow the Gopher rules (Rae et al. 2021, appendix A) loosened where the
demo world's short, template-made documents would otherwise be dropped (min_words, alpha fraction).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from kubellm.core.config import StrictModel
from kubellm.core.manifest import stable_hash

# Fields that decide how the work is scheduled, not what it produces: left out of the config hash, so
# a fanned-out pipeline run, a single-step run and a run with any num_proc of the same sources publish
# the same artifact (the map's results are gathered in shard order whatever the process count).
EXECUTION_FIELDS = frozenset({"fan_out", "fan_out_parallelism", "num_proc"})


class QualityFilters(StrictModel):
    """Gopher/C4-family document filters. A document failing several is counted under the first
    (in the order listed here). Set a field to null to disable that filter."""

    min_words: int | None = Field(default=20, ge=0)
    """Drop documents with fewer words (Gopher: 50). Words are whitespace-separated, so a document in a
    script written without spaces (Chinese, Japanese, Thai) is a few "words": set null for such text."""
    max_words: int | None = Field(default=100_000, ge=1)
    """Drop documents with more words."""
    min_mean_word_length: float | None = Field(default=3.0, ge=0)
    """Drop documents whose mean word length (characters) is below this."""
    max_mean_word_length: float | None = Field(default=10.0, ge=0)
    """Drop documents whose mean word length is above this."""
    max_symbol_word_ratio: float | None = Field(default=0.1, ge=0)
    """Drop documents with more than this many `#` / ellipsis symbols per word."""
    max_ellipsis_line_fraction: float | None = Field(default=0.3, ge=0, le=1)
    """Drop documents where more than this fraction of lines end with `...` or `…`."""
    min_alpha_word_fraction: float | None = Field(default=0.6, ge=0, le=1)
    """Drop documents where fewer than this fraction of words contain a letter (Gopher: 0.8; the
    demo world's arithmetic lessons are number-heavy)."""
    max_duplicate_line_fraction: float | None = Field(default=0.3, ge=0, le=1)
    """Drop documents where more than this fraction of (non-empty) lines are repeats of another line."""
    max_top_ngram_fraction: dict[Annotated[int, Field(ge=1)], Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    """n -> maximum fraction of characters covered by the single most frequent word n-gram; each n
    is at least 1 and each fraction in [0, 1] ({} disables the filter)."""


class DedupConfig(StrictModel):
    """Exact (hash of normalised text) and MinHash near-duplicate removal (datasketch MinHash + LSH)."""

    exact: bool = True
    """Drop documents whose normalised text (lower-cased, whitespace collapsed) was already seen."""
    near: bool = True
    """Drop documents whose estimated Jaccard similarity to an earlier kept document ≥ threshold."""
    threshold: float = Field(default=0.8, gt=0, le=1)
    """Jaccard threshold of the MinHash LSH index."""
    num_perm: int = Field(default=128, ge=16, le=1024)
    """MinHash permutations (signature length); more is more precise and slower."""
    ngram: int = Field(default=5, ge=1, le=32)
    """Shingle size in words."""
    seed: int = 1
    """Seed of the MinHash permutations (all shards must share it)."""
    hash: Literal["xxh32", "sha1"] = "xxh32"
    """Base hash of each shingle before the MinHash permutations: xxh32 (xxhash, one C call) or sha1
    (datasketch's default; ~4× slower per shingle). Both are 32-bit and stable across processes."""


class PIIConfig(StrictModel):
    """Optional scrubbing of personal data: matches are replaced by a placeholder, not dropped."""

    enabled: bool = False
    """Scrub emails, phone numbers and IP addresses."""
    emails: bool = True
    """Replace e-mail addresses with `<EMAIL>`."""
    phones: bool = True
    """Replace phone numbers with `<PHONE>`: 7+ digits in a phone's shape (+country code and groups,
    North American (415) 555-0132, or a national number with its trunk 0: 020 7946 0958); dates, times
    and prices are left alone (a run of two-digit groups can still read as a French number)."""
    ips: bool = True
    """Replace IPv4 and IPv6 addresses with `<IP>`."""


class DataPrepConfig(StrictModel):
    text_field: str = "text"
    """Name of the text column in json/jsonl/parquet sources."""
    validation_fraction: float = Field(default=0.05, ge=0, lt=1)
    """Fraction of documents (chosen by a hash of the text, deterministic) held out for validation."""
    max_bad_fraction: float = Field(default=0.01, ge=0, le=1)
    """Fail the stage when more than this fraction of records is unreadable."""
    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = "NFC"
    """Unicode normalisation applied to every document before filtering."""
    max_doc_bytes: int = Field(default=8 * 1024 * 1024, ge=1)
    """A record larger than this is a bad record, skipped without being held in memory whole. It is a
    bound on what is read, so it counts bytes as stored: a JSON line's raw bytes (its JSON syntax and
    `\\u` escapes included), a text document's bytes with their line endings, a parquet or hub value's
    UTF-8 bytes."""
    text_sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    """How plain-text files split into documents: each line, blank-line separated paragraphs, or
    the whole file."""
    hub_split: str = "train"
    """Split to stream when a source is a Hugging Face Hub dataset (`hf:<name>[:<config>]`), and the
    split read from a local or S3 `datasets` save_to_disk DatasetDict."""
    docs_per_shard: int = Field(default=50_000, ge=1)
    """Documents per output parquet shard. Memory is bounded by the write batch: this many documents
    or 64 MiB of text, whichever comes first."""
    num_proc: int = Field(default=1, ge=1)
    """Input shards cleaned in parallel processes (the map step); 1 = in this process."""
    fan_out: bool = False
    """Pipeline only: run data prep as list-shards -> `dsl.ParallelFor` prepare-shard (one pod per
    input shard) -> dedup-reduce (global exact + near dedup, split, publish) instead of one step.
    Same artifact either way. Off: one step (what `kubellm run --local` always runs; kfp.local
    cannot run a step after a ParallelFor)."""
    fan_out_parallelism: int = Field(default=8, ge=0)
    """Pipeline only, with fan_out: most prepare-shard pods running at once (the ParallelFor's
    `parallelism`; 0 = no limit)."""
    filters: QualityFilters = Field(default_factory=QualityFilters)
    """Quality filters."""
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    """Exact and near-duplicate removal."""
    pii: PIIConfig = Field(default_factory=PIIConfig)
    """Optional PII scrubbing."""

    def config_hash(self) -> str:
        return stable_hash(self.model_dump(mode="json", exclude=set(EXECUTION_FIELDS)))
