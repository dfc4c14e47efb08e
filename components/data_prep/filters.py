"""Document-level cleaning: Unicode normalisation, Gopher/C4-family quality filters, PII scrubbing,
and the keys used for dedup (exact hash, MinHash signature).

    from kubellm.data_prep.filters import quality_reason
    quality_reason("short text", QualityFilters())   # -> "min_words"
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from functools import lru_cache

import numpy as np

from kubellm.data_prep.config import DedupConfig, PIIConfig, QualityFilters

_WS = re.compile(r"\s+")
_WORD_PUNCT = re.compile(r"[^\w\s]")
_ALPHA = re.compile(r"[^\W\d_]")  # a letter in any script
# letters of alphabetic scripts (Latin with its accents, Greek, Cyrillic) in the local part and the domain
# (josé@exämple.de); not those of scripts written without spaces, where the text around an address is
# letters too (请发邮件至abc@example.com获取: the address, not the sentence)
_MAIL_LETTERS = "A-Za-z\u00C0-\u024F\u0370-\u03FF\u0400-\u04FF"
_EMAIL = re.compile(rf"(?<![{_MAIL_LETTERS}0-9._%+-])[{_MAIL_LETTERS}0-9._%+-]+@[{_MAIL_LETTERS}0-9-]+"
                    rf"(?:\.[{_MAIL_LETTERS}0-9-]+)*\.[{_MAIL_LETTERS}]{{2,}}(?![{_MAIL_LETTERS}0-9-])")
# A phone number has a phone's shape, not just 7+ digits in groups (which dates, prices and lists of
# numbers also have): +country code, then groups or an area code in parentheses (+44 (0)20 7946 0958,
# +4915112345678); North American (415) 555-0132 / 415-555-0132; or a national number with its trunk 0
# (020 7946 0958, 0211 123-4567, 030/12345678, 01 23 45 67 89, 01.23.45.67.89: dots only throughout, so
# times such as 09.30 10.45 are none). Dates are left alone (`_DATE`, also a date a match starts or ends
# with: 05-03-2024 15). A 7-digit local number without an area code (555-0132) is not taken: that shape
# is as often a range or a part number. A run of two-digit groups (a lottery draw) still reads as a
# French number: scrubbing errs towards removing.
_PHONE = re.compile(
    r"(?<!\w)(?<!\d[.,])(?:"
    r"\+\d{8,15}|\+\d{1,3}(?:[\s.-]?\(\d{1,4}\)[\s.-]?\d{1,8})?(?:[\s.-]\d{1,8}){0,5}"
    r"|\(\d{3}\)[\s.-]?\d{3}[\s.-]\d{4}|\d{3}([.-])\d{3}\1\d{4}|\d{3} \d{3} \d{4}"
    r"|0\d{1,4}(?:[ \t/-]\d{2,8}){1,4}|0\d{1,4}(?:\.\d{2,8}){1,4}"
    r")(?!\w|[.,-]\d)")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?!\w|\.\d)")
# candidates, each checked with `ipaddress` (compressed forms, any number of groups after ::)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}")
_DATE_AT_AN_END = re.compile(rf"^(?:{_DATE.pattern})(?!\d)|(?<!\d)(?:{_DATE.pattern})$")

FILTER_NAMES = ("min_words", "max_words", "min_mean_word_length", "max_mean_word_length",
                "max_symbol_word_ratio", "max_ellipsis_line_fraction", "min_alpha_word_fraction",
                "max_duplicate_line_fraction", "max_top_ngram_fraction")


def normalize(text: str, form: str) -> str:
    """Unicode normalisation + newline unification + outer whitespace strip."""
    if form != "none":
        text = unicodedata.normalize(form, text)  # type: ignore[arg-type]
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _top_ngram_fraction(words: list[str], n: int) -> float:
    """Fraction of characters covered by the most frequent word n-gram (Gopher's repetition rule)."""
    if len(words) < n:
        return 0.0
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    total = sum(len(w) for w in words)
    return count * sum(len(w) for w in gram) / max(total, 1)


def quality_reason(text: str, f: QualityFilters) -> str | None:
    """The name of the first quality filter `text` fails, or None when it passes them all."""
    words = text.split()
    n = len(words)
    if f.min_words is not None and n < f.min_words:
        return "min_words"
    if f.max_words is not None and n > f.max_words:
        return "max_words"
    if f.min_mean_word_length is not None or f.max_mean_word_length is not None:
        mean_len = sum(len(w) for w in words) / max(n, 1)
        if f.min_mean_word_length is not None and mean_len < f.min_mean_word_length:
            return "min_mean_word_length"
        if f.max_mean_word_length is not None and mean_len > f.max_mean_word_length:
            return "max_mean_word_length"
    if f.max_symbol_word_ratio is not None:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / max(n, 1) > f.max_symbol_word_ratio:
            return "max_symbol_word_ratio"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if f.max_ellipsis_line_fraction is not None and lines:
        ell = sum(ln.endswith(("...", "…")) for ln in lines)
        if ell / len(lines) > f.max_ellipsis_line_fraction:
            return "max_ellipsis_line_fraction"
    if f.min_alpha_word_fraction is not None and n:
        alpha = sum(1 for w in words if _ALPHA.search(w))
        if alpha / n < f.min_alpha_word_fraction:
            return "min_alpha_word_fraction"
    if f.max_duplicate_line_fraction is not None and len(lines) > 1:
        dup = len(lines) - len(set(lines))
        if dup / len(lines) > f.max_duplicate_line_fraction:
            return "max_duplicate_line_fraction"
    if f.max_top_ngram_fraction:
        lowered = [w.lower() for w in words]
        for ng, limit in sorted(f.max_top_ngram_fraction.items()):
            if _top_ngram_fraction(lowered, ng) > limit:
                return "max_top_ngram_fraction"
    return None


def _is_ipv6(s: str) -> bool:
    """A valid IPv6 address with at least two groups written and a digit: a bare `::` or `::2` is more
    likely code (`a[::2]`, `f :: Int`, `::=`) than an address, and so are hex words (`dead::beef`)."""
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return sum(1 for g in s.split(":") if g) >= 2 and any(c.isdigit() for c in s)


def _is_ipv4(s: str) -> bool:
    """Not four single digits: `section 3.1.2.4` is a section number, not an address."""
    return any(len(octet) > 1 for octet in s.split("."))


def _is_phone(s: str) -> bool:
    return sum(c.isdigit() for c in s) >= 7 and not _DATE_AT_AN_END.search(s)


def _replace(pattern: re.Pattern[str], text: str, placeholder: str,
             accept: Callable[[str], bool]) -> tuple[str, int]:
    """`pattern`'s matches that `accept` takes replaced by `placeholder`; returns (text, replacements)."""
    n = 0

    def one(m: re.Match[str]) -> str:
        nonlocal n
        if not accept(m.group(0)):
            return m.group(0)
        n += 1
        return placeholder

    return pattern.sub(one, text), n


def scrub_pii(text: str, cfg: PIIConfig) -> tuple[str, int]:
    """Replace emails, IPs and phone numbers with placeholders; returns (text, replacements)."""
    total = 0
    if cfg.emails:
        text, k = _EMAIL.subn("<EMAIL>", text)
        total += k
    if cfg.ips:  # before phones: a dotted IPv4 also looks like a phone number
        text, k = _replace(_IPV4, text, "<IP>", _is_ipv4)
        total += k
        text, k = _replace(_IPV6, text, "<IP>", _is_ipv6)
        total += k
    if cfg.phones:
        text, k = _replace(_PHONE, text, "<PHONE>", _is_phone)
        total += k
    return text, total


def dedup_key(text: str) -> bytes:
    """Exact-dedup key: 128-bit hash of the lower-cased, whitespace-collapsed text."""
    return hashlib.blake2b(_WS.sub(" ", text.lower()).strip().encode("utf-8"), digest_size=16).digest()


def split_of(text: str, validation_fraction: float) -> str:
    """Deterministic split by hash: the same text lands in the same split on every run and machine."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return "validation" if h / 2**64 < validation_fraction else "train"


def _words(text: str) -> list[str]:
    """The lower-cased text's words with punctuation stripped; a text with no word characters (only
    symbols, emoji) is its non-space characters instead, so such texts do not all share one empty
    shingle and count as near-duplicates of each other."""
    low = text.lower()
    return _WORD_PUNCT.sub(" ", low).split() or [c for c in low if not c.isspace()]


def shingles(text: str, n: int) -> list[bytes]:
    """Word n-gram shingles of the punctuation-stripped, lower-cased text (`_words`)."""
    words = _words(text)
    if len(words) < n:
        return [" ".join(words).encode("utf-8")]
    return list({" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)})


def shingle_hash(name: str) -> Callable[[bytes], int]:
    """The shingle hash `DedupConfig.hash` names; both give 32-bit ints for datasketch's affine32 scheme."""
    if name == "xxh32":
        import xxhash

        return xxhash.xxh32_intdigest
    from datasketch.hashfunc import sha1_hash32

    return sha1_hash32


@lru_cache(maxsize=8)
def _template(num_perm: int, seed: int, hash_name: str):  # type: ignore[no-untyped-def]
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed, hashfunc=shingle_hash(hash_name))


def shingle_hashes(text: str, n: int, hashfunc: Callable[[bytes], int]) -> list[int]:
    """`hashfunc` of each of `shingles(text, n)`, built from one encode of the text (words hold no
    whitespace, and UTF-8 never puts a 0x20 byte inside a character, so splitting the encoded words on
    b" " gives each word's bytes). Repeated shingles are hashed again rather than removed: a MinHash
    is a minimum, which they do not change."""
    words = _words(text)
    if len(words) < n:
        return [hashfunc(" ".join(words).encode("utf-8"))]
    bw = " ".join(words).encode("utf-8").split(b" ")
    return [hashfunc(b" ".join(bw[i : i + n])) for i in range(len(bw) - n + 1)]


#: shingles per (num_perm × shingles) uint32 block of `minhash_signatures` (8 MiB at 128 permutations)
_SIG_ROWS = 16384
#: characters of text whose shingle hashes are held at once (~10 bytes each: Python ints, then arrays)
_SIG_TEXT_CHARS = 4 << 20


def minhash_signatures(texts: list[str], cfg: DedupConfig) -> np.ndarray:
    """(len(texts), num_perm) datasketch MinHash signatures — each row what `MinHash.update_batch` of
    the text's shingles gives (affine32 scheme, shingles hashed with `cfg.hash`), computed for a group
    of documents at once: one murmur finaliser and one affine permutation over all the group's shingle
    hashes, in blocks, and a segmented minimum per document, instead of a MinHash object and a dozen
    small numpy calls per document. Groups hold ~4 MiB of text, so memory stays bounded whatever the
    batch. All shards share `cfg.seed` and `cfg.hash`, so signatures are comparable in the global reduce."""
    out = np.full((len(texts), cfg.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    start, chars = 0, 0
    for i, text in enumerate(texts):
        chars += len(text)
        if chars >= _SIG_TEXT_CHARS or i == len(texts) - 1:
            _signatures_into(out[start : i + 1], texts[start : i + 1], cfg)
            start, chars = i + 1, 0
    return out


def _signatures_into(out: np.ndarray, texts: list[str], cfg: DedupConfig) -> None:
    from datasketch.minhash import _fmix  # the finaliser datasketch's affine32 scheme applies

    t = _template(cfg.num_perm, cfg.seed, cfg.hash)
    if t.scheme != "affine32":  # pragma: no cover - datasketch's default scheme is pinned in _template
        raise RuntimeError(f"datasketch MinHash scheme {t.scheme!r}: kubellm computes affine32 signatures")
    per_doc = [shingle_hashes(x, cfg.ngram, t.hashfunc) for x in texts]
    counts = np.fromiter(map(len, per_doc), dtype=np.int64, count=len(per_doc))
    hv = _fmix(np.fromiter(itertools.chain.from_iterable(per_doc), dtype=np.uint32, count=int(counts.sum())), 32)
    del per_doc
    doc_of_row = np.repeat(np.arange(len(texts)), counts)
    a, b = t.permutations
    for r0 in range(0, len(hv), _SIG_ROWS):
        docs = doc_of_row[r0 : r0 + _SIG_ROWS]
        # (num_perm, rows): each permutation's values of one document lie contiguous for the
        # segmented minimum (6× faster than reducing down the columns of a (rows, num_perm) block)
        phv = a[:, None] * hv[None, r0 : r0 + _SIG_ROWS] + b[:, None]  # uint32 wraps, as datasketch's does
        starts = np.concatenate(([0], np.flatnonzero(docs[1:] != docs[:-1]) + 1))
        ids = docs[starts]  # a document cut by a block boundary is finished by the next block
        out[ids] = np.minimum(out[ids], np.minimum.reduceat(phv, starts, axis=1).T)


def minhash_signature(text: str, cfg: DedupConfig) -> np.ndarray:
    """The signature of one text (`minhash_signatures` of a batch of one)."""
    return minhash_signatures([text], cfg)[0]


def signature_dtype(cfg: DedupConfig) -> np.dtype:
    return np.dtype(_template(cfg.num_perm, cfg.seed, cfg.hash).hashvalues.dtype).newbyteorder("<")


def signature_scheme(cfg: DedupConfig) -> str:
    return str(_template(cfg.num_perm, cfg.seed, cfg.hash).scheme)
