"""Unit tests of the document-level pieces: normalisation, quality filters, PII, dedup keys, split."""

from __future__ import annotations

import numpy as np
import pytest

from kubellm.data_prep import filters as F
from kubellm.data_prep.config import DedupConfig, PIIConfig, QualityFilters

GOOD = ("The old baker of Tarsk opens the shop early every morning and sells warm bread to the "
        "sailors who come up from the harbour before the market starts; everyone knows the smell.")


def test_good_text_passes_every_filter() -> None:
    assert F.quality_reason(GOOD, QualityFilters()) is None


def test_each_quality_filter_names_itself() -> None:
    f = QualityFilters()
    cases = {
        "min_words": "too short to keep",
        "max_words": " ".join(["word"] * 50),
        "min_mean_word_length": " ".join(["a b c d"] * 10),
        "max_mean_word_length": " ".join(["extraordinarilylongwordsonly"] * 30),
        "max_symbol_word_ratio": GOOD + " #tag #tag #tag #tag #tag #tag #tag #tag",
        "max_ellipsis_line_fraction": "\n".join(["this line trails off into nothing ..."] * 3 + [GOOD]),
        "min_alpha_word_fraction": GOOD + " " + " ".join(str(1000 + i) for i in range(40)),
        "max_duplicate_line_fraction": "\n".join(["the same line of text again and again here"] * 4 + [GOOD]),
        "max_top_ngram_fraction": "buy cheap " * 20 + GOOD,
    }
    for name, text in cases.items():
        cfg = f.model_copy(update={"max_words": 40}) if name == "max_words" else f
        assert F.quality_reason(text, cfg) == name, name
    # a disabled filter lets the text through
    assert F.quality_reason("too short to keep", f.model_copy(update={"min_words": None})) is None


def test_nfc_normalisation_and_newlines() -> None:
    decomposed = "Cafe\u0301\r\nna\u0131ve "
    assert F.normalize(decomposed, "NFC") == "Caf\u00e9\nna\u0131ve"
    assert F.normalize("\ufb01", "NFKC") == "fi" and F.normalize("\ufb01", "none") == "\ufb01"


def test_pii_scrubbing() -> None:
    text = ("Mail jane.doe@example.org or call +1 415-555-0132, server 192.168.10.20, "
            "v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334; the year 2024 and 3 + 4 stay.")
    out, n = F.scrub_pii(text, PIIConfig(enabled=True))
    assert "<EMAIL>" in out and "<PHONE>" in out and out.count("<IP>") == 2
    assert "jane" not in out and "415" not in out and "192.168" not in out
    assert "2024" in out and "3 + 4" in out and n == 4


@pytest.mark.parametrize(("text", "scrubbed"), [
    # phones in their usual shapes
    ("UK 020 7946 0958, FR 01 23 45 67 89.", "UK <PHONE>, FR <PHONE>."),
    ("US (415) 555-0132 or 415.555.0132 or 415 555 0132; DE +49 (30) 123456.",
     "US <PHONE> or <PHONE> or <PHONE>; DE <PHONE>."),
    # numbers that are not phones stay (before: dates, prices and counting runs became <PHONE>)
    ("Released 2024.03.15 and 15-03-2024, then 03.15.2024.", None),
    ("Count by tens: 10 20 30 40 50.", None),
    ("total 12.50 13.75 14.00 and 1,234,567 people, pi 3.14159265", None),
    # IPv6 in compressed forms is scrubbed whole (before: the groups after '::' leaked); a time is not one
    ("addr 2001:db8::8a2e:370:7334 and fe80::1 at 10:30:45", "addr <IP> and <IP> at 10:30:45"),
    ("dotted 1.2.3.4.5 is no address", None),  # before: "<IP>.5"
    ("code a[::-1], a[::2], f :: Int, expr ::= term", None),  # '::' alone is no address
    ("+44 (0)20 7946 0958, +49 (30) 123456 or +4915112345678", "<PHONE>, <PHONE> or <PHONE>"),
    ("2+2=4 and 3 +5 7, scores +12.5 and +13.75", None),
    # a date with a number after it, times, section numbers and hex words stay (before: "<PHONE> guests",
    # "<PHONE> 11.15", "<IP>")
    ("on 05-03-2024 15 guests; times 09.30 10.45 11.15", None),
    # a phone with a number after it is still one (hours, counts), and separators may mix
    ("Call us at 415-555-0132 24/7, hotline 0800 555 1234 24h, Kontakt 030 1234567 9-17 Uhr",
     "Call us at <PHONE> 24/7, hotline <PHONE> 24h, Kontakt <PHONE> 9-17 Uhr"),
    ("Call (415) 555-0132 2 times or Tel.: 0211 123-4567", "Call <PHONE> 2 times or Tel.: <PHONE>"),
    # an address inside text written without spaces: the address, not the sentence around it
    ("请发邮件至abc@example.com获取更多信息, メールはtaro@example.jpまで", "请发邮件至<EMAIL>获取更多信息, メールは<EMAIL>まで"),
    ("see section 3.1.2.4 and dead::beef, cafe::babe", None),
    # any script in an e-mail address; a trunk 0 with '/' (DE); an address with a one-digit octet
    ("josé@example.com, user@exämple.de, DE 030/12345678, host 10.0.0.1",
     "<EMAIL>, <EMAIL>, DE <PHONE>, host <IP>"),
    ("a phone at a line's end 020 7946 0958\n2 Main Street", "a phone at a line's end <PHONE>\n2 Main Street"),
])
def test_pii_scrubbing_takes_phone_and_address_shapes_only(text: str, scrubbed: str | None) -> None:
    out, n = F.scrub_pii(text, PIIConfig(enabled=True))
    assert out == (scrubbed or text)
    assert n == (out.count("<PHONE>") + out.count("<IP>") + out.count("<EMAIL>"))


def test_texts_without_words_are_not_all_near_duplicates() -> None:
    """Symbols or emoji only: shingled by character, not all as one empty shingle."""
    cfg = DedupConfig()
    a, b = F.minhash_signatures(["\U0001f600 \U0001f600 \U0001f389 !!!", "--- *** ???"], cfg)
    assert (a == b).mean() < 0.5
    assert sorted(F.shingles("--- ***", 5)) == [b"- - * * *", b"- - - * *"]  # 5-grams of its characters


def test_exact_key_ignores_case_and_whitespace() -> None:
    assert F.dedup_key("Hello  World\n") == F.dedup_key("hello world")
    assert F.dedup_key("hello world") != F.dedup_key("hello words")


def test_minhash_signatures_estimate_jaccard() -> None:
    cfg = DedupConfig()
    a = F.minhash_signature(GOOD, cfg)
    b = F.minhash_signature(GOOD.replace("warm", "fresh"), cfg)
    c = F.minhash_signature("A completely different sentence about parrots and the sea " * 3, cfg)
    assert a.shape == (cfg.num_perm,) and a.dtype == F.signature_dtype(cfg)
    assert np.mean(a == b) > 0.5 > np.mean(a == c)
    assert np.array_equal(a, F.minhash_signature(GOOD, cfg))  # deterministic


def test_minhash_base_hash_option_is_datasketch_with_that_hashfunc() -> None:
    from datasketch import MinHash
    from datasketch.hashfunc import sha1_hash32

    sha1 = DedupConfig(hash="sha1")
    plain = MinHash(num_perm=sha1.num_perm, seed=sha1.seed)  # datasketch's defaults: sha1_hash32, affine32
    plain.update_batch(F.shingles(GOOD, sha1.ngram))
    assert plain.hashfunc is sha1_hash32
    assert np.array_equal(F.minhash_signature(GOOD, sha1), plain.hashvalues)
    xx = DedupConfig()  # default xxh32: another base hash, so other signatures, same estimator
    assert xx.hash == "xxh32" and not np.array_equal(F.minhash_signature(GOOD, xx), plain.hashvalues)
    assert F.signature_dtype(xx) == F.signature_dtype(sha1)
    near = GOOD.replace("warm", "fresh")
    est = {c.hash: np.mean(F.minhash_signature(GOOD, c) == F.minhash_signature(near, c)) for c in (xx, sha1)}
    assert 0.5 < est["xxh32"] < 1 and abs(est["xxh32"] - est["sha1"]) < 0.15  # both estimate the same Jaccard


# blocks that cut documents apart, one shingle a block; groups of a few documents, one document a group
@pytest.mark.parametrize("rows, chars", [(16384, 4 << 20), (7, 4 << 20), (1, 4 << 20), (16384, 300), (7, 1)])
@pytest.mark.parametrize("hash_name", ["xxh32", "sha1"])
def test_batched_signatures_are_datasketchs(monkeypatch: pytest.MonkeyPatch, rows: int, chars: int,
                                            hash_name: str) -> None:
    """The batch's signatures equal datasketch `MinHash.update_batch` over each text's shingle set:
    Unicode whitespace and letters, punctuation, repeated shingles, texts shorter than a shingle."""
    import random

    from datasketch import MinHash

    monkeypatch.setattr(F, "_SIG_ROWS", rows)
    monkeypatch.setattr(F, "_SIG_TEXT_CHARS", chars)
    rng = random.Random(rows)
    alphabet = "ab cd, éß\u00a0\u3000x!y\n日本 z\u2003."
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))) for _ in range(60)]
    texts += ["", "one", "a b c d e", "the the the the the the the", GOOD]
    cfg = DedupConfig(hash=hash_name)
    sigs = F.minhash_signatures(texts, cfg)
    assert sigs.shape == (len(texts), cfg.num_perm) and sigs.dtype == np.uint32
    for text, sig in zip(texts, sigs, strict=True):
        plain = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=F.shingle_hash(hash_name))
        plain.update_batch(F.shingles(text, cfg.ngram))
        assert np.array_equal(sig, plain.hashvalues), text


def test_split_is_deterministic_and_roughly_proportional() -> None:
    texts = [f"document number {i}" for i in range(4000)]
    splits = [F.split_of(t, 0.1) for t in texts]
    assert splits == [F.split_of(t, 0.1) for t in texts]
    assert 0.07 < splits.count("validation") / len(texts) < 0.13
