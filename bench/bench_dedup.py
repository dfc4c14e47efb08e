"""Near-dedup throughput and quality: the data-prep stage's MinHash path against plain datasketch.

kubellm's near-dedup *is* datasketch (`MinHash` signatures in the map step, `MinHashLSH` in the
reduce step), so this measures our end-to-end dedup step — `prepare_shard` (read jsonl, normalise,
exact key + MinHash signature, write parquet + signatures; quality filters switched off) followed by
`global_dedup` (exact + LSH, first occurrence wins) — against plain datasketch usage with the same
parameters (threshold, num_perm, seed, 5-word shingles, the shingle hash `data_prep.dedup.hash`, the
LSH's band weights `LSH_WEIGHTS`): `MinHash.bulk` over in-memory texts, then `MinHashLSH`
query/insert. Ours also checks each LSH candidate against the kept document's signature; the
reference takes every candidate as a duplicate, as plain datasketch usage does. The corpus is
random-word documents (150 words from a 5000-word vocabulary, so unrelated documents share no
5-gram) with two planted kinds, each placed after the document it was made from:
  near-duplicates  1-3 words of an earlier document substituted; kept only when the true 5-gram
                   Jaccard (computed exactly) is in [0.85, 0.98] — spread over the range above the
                   0.8 threshold, not one easy point; recall is measured on these
  hard negatives   an earlier document's first 85-125 words followed by fresh words; kept only when
                   the true Jaccard is in [0.40, 0.70] — they share long passages and are candidates
                   for the LSH now and then, and must not be removed; precision counts them
The band (0.70, 0.85) around the threshold is left out: there MinHash's estimate decides either way.

    python -m bench.bench_dedup            # 4000 documents + 1000 near-duplicates + 1000 hard negatives
    python -m bench.bench_dedup --quick

Targets (issue 12): ≥ 1.0× datasketch throughput; recall ≥ 0.95, precision ≥ 0.99 on planted pairs.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from pathlib import Path

import numpy as np

from bench.common import Row, alternate, at_least, emit, load_avg, median, parser, repeats, timed

_PUNCT = re.compile(r"[^\w\s]")


def _shingles(text: str, n: int = 5) -> set[str]:
    w = text.split()
    return {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: str, b: str) -> float:
    sa, sb = _shingles(a), _shingles(b)
    return len(sa & sb) / len(sa | sb)


def planted_corpus(n_base: int, n_dup: int, n_neg: int, words: int = 150,
                   seed: int = 0) -> tuple[list[str], set[int], set[int], list[float]]:
    """(documents, indices of planted near-duplicates, indices of hard negatives, every planted
    pair's true Jaccard); each planted document comes after the one it was made from."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(5000)]
    docs = [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n_base)]
    dups: set[int] = set()
    negs: set[int] = set()
    js: list[float] = []
    kinds = ["dup"] * n_dup + ["neg"] * n_neg
    rng.shuffle(kinds)
    for kind in kinds:
        while True:
            base = rng.choice(docs[:n_base])
            w = base.split()
            if kind == "dup":
                for _ in range(rng.randint(1, 3)):
                    w[rng.randrange(len(w))] = rng.choice(vocab)
            else:
                keep = rng.randint(85, 125)
                w = w[:keep] + [rng.choice(vocab) for _ in range(words - keep)]
            doc = " ".join(w)
            j = jaccard(base, doc)
            if (0.85 <= j <= 0.98) if kind == "dup" else (0.40 <= j <= 0.70):
                break
        docs.append(doc)
        (dups if kind == "dup" else negs).add(len(docs) - 1)
        js.append(j)
    return docs, dups, negs, js


def quality(removed: set[int], planted: set[int]) -> tuple[float, float]:
    hit = len(removed & planted)
    return hit / max(len(planted), 1), hit / max(len(removed), 1)


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    from datasketch import MinHash, MinHashLSH

    from kubellm.data_prep.config import DataPrepConfig, QualityFilters
    from kubellm.data_prep.filters import shingle_hash
    from kubellm.data_prep.stage import LSH_WEIGHTS, global_dedup, prepare_shard

    load = load_avg()
    n_base, n_dup = (400, 100) if args.quick else (4000, 1000)
    docs, planted, negatives, js = planted_corpus(n_base, n_dup, n_dup)
    off = {k: None for k in QualityFilters.model_fields if k != "max_top_ngram_fraction"}
    cfg = DataPrepConfig(filters=QualityFilters(**off, max_top_ngram_fraction={}))
    d = cfg.dedup
    results: dict[str, set[int]] = {}

    with tempfile.TemporaryDirectory(prefix="kubellm-bench-dedup-") as t:
        tmp = Path(t)
        src = tmp / "corpus.jsonl"
        src.write_text("".join(json.dumps({"text": x}) + "\n" for x in docs))
        runs = [0]

        def ours() -> None:
            runs[0] += 1
            work = tmp / f"work{runs[0]}"
            prepare_shard(str(src), 0, cfg, str(work))
            global_dedup(str(work), cfg, 1)
            keep = np.load(next(work.rglob("keep.npy")))
            results["ours"] = {int(i) for i in np.flatnonzero(~keep)}

        def reference() -> None:
            texts = [json.loads(line)["text"] for line in src.read_text().splitlines()]
            shingle_sets = []
            for x in texts:
                w = _PUNCT.sub(" ", x.lower()).split()
                shingle_sets.append({" ".join(w[i : i + d.ngram]).encode() for i in range(len(w) - d.ngram + 1)})
            sigs = MinHash.bulk(shingle_sets, num_perm=d.num_perm, seed=d.seed, hashfunc=shingle_hash(d.hash))
            lsh = MinHashLSH(threshold=d.threshold, num_perm=d.num_perm, weights=LSH_WEIGHTS)
            removed = set()
            for i, m in enumerate(sigs):
                if lsh.query(m):
                    removed.add(i)
                else:
                    lsh.insert(i, m, check_duplication=False)
            results["reference"] = removed

        samples = alternate({"ours": timed(ours), "reference": timed(reference)}, repeats(args))
    n = len(docs)
    t_ours, t_ref = median(samples["ours"]), median(samples["reference"])
    order = sorted(planted | negatives)
    dj = [j for i, j in zip(order, js, strict=True) if i in planted]
    nj = [j for i, j in zip(order, js, strict=True) if i in negatives]
    rec, prec = quality(results["ours"], planted)
    rrec, rprec = quality(results["reference"], planted)
    ratio = t_ref / t_ours
    rec_ratio = rec / rrec if rrec else None  # the reference removing nothing leaves no ratio
    prec_ratio = prec / rprec if rprec else None
    met, note = at_least(ratio, 1.0)
    k = len(samples["ours"])
    return emit([
        Row("near-dedup throughput (prepare_shard + global_dedup) vs datasketch MinHash.bulk + LSH",
            n / t_ours, n / t_ref, "docs/s", ratio, "≥ 1.0×", met,
            f"{n} docs, {d.hash} shingle hash both; ours includes jsonl read, NFC, exact key, parquet + "
            f"signature writes, candidate checks. {note}".strip(),
            load, k),
        Row("near-dedup recall on planted pairs", rec, rrec, "fraction", rec_ratio, "ours ≥ 0.95", rec >= 0.95,
            f"{n_dup} planted near-duplicates, true Jaccard {min(dj):.2f}-{max(dj):.2f} (median {median(dj):.2f}); "
            "the target applies to ours, the ratio is ours / reference", load, k),
        Row("near-dedup precision on planted pairs", prec, rprec, "fraction", prec_ratio, "ours ≥ 0.99",
            prec >= 0.99, f"removed: ours {len(results['ours'])}, reference {len(results['reference'])}; of the "
            f"{len(negatives)} hard negatives (true Jaccard {min(nj):.2f}-{max(nj):.2f}, not duplicates) removed: "
            f"ours {len(results['ours'] & negatives)}, reference {len(results['reference'] & negatives)}", load, k),
    ], args)


if __name__ == "__main__":
    raise SystemExit(main())
