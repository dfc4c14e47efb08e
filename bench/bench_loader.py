"""Pretraining loader: building packed windows with document masking (per-token document ids and
positions restarting per document) on a shard of many short documents.

    python -m bench.bench_loader           # 10M tokens in 2M documents, seq_len 512
    python -m bench.bench_loader --quick   # smoke run

Ours is `PackedWindowLoader._window` (what the loader's prefetch thread calls per window): it searches
the shard's own uint64 offset table in place. The reference builds the same arrays after converting
the whole offset table to int64 for each window, which is what the loader did until 2026-11-24 (a full
copy of `doc_count + 1` offsets per window). Both results are checked equal before timing. No issue
target: the row shows what the loader's thread spends per window, next to a training step's tens of
milliseconds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from bench.common import Row, alternate, emit, load_avg, median, parser, repeats, timed

SEQ = 512


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    from kubellm.tokenizer.shards import TokenShardWriter
    from kubellm.training.data import PackedWindowLoader, open_shards

    load = load_avg()
    n_docs, n_tokens = (20_000, 100_000) if args.quick else (2_000_000, 10_000_000)
    with tempfile.TemporaryDirectory(prefix="kubellm-bench-loader-") as t:
        path = Path(t) / "a.tok"
        writer = TokenShardWriter(path, 512)
        writer.add_packed(np.random.default_rng(0).integers(0, 512, n_tokens), np.full(n_docs, n_tokens // n_docs))
        writer.close()
        loader = PackedWindowLoader(open_shards([path], 512), seq_len=SEQ, micro_batch_size=8, dp_rank=0,
                                    dp_size=1, seed=0, doc_masking=True)
        shard = loader.shards[0]
        items = [int(i) for i in loader._rank_items(0)[:400]]

        def reference_window(item: int) -> tuple[np.ndarray, np.ndarray]:
            start = item * SEQ  # one shard: window i starts at i * seq_len
            offs = np.asarray(shard.doc_offsets, dtype=np.int64)  # the per-window copy
            pos = np.arange(start, start + SEQ)
            doc = np.searchsorted(offs, pos, side="right") - 1
            return doc - doc[0], pos - np.maximum(offs[doc], start)

        for item in items[:20]:
            ours_w, (doc_ids, positions) = loader._window(item), reference_window(item)
            assert np.array_equal(ours_w["doc_ids"], doc_ids) and np.array_equal(ours_w["position_ids"], positions)

        def ours() -> None:
            for item in items:
                loader._window(item)

        def reference() -> None:
            for item in items:
                reference_window(item)

        samples = alternate({"ours": timed(ours), "reference": timed(reference)}, repeats(args))
        loader.close()
    t_ours, t_ref = median(samples["ours"]) / len(items), median(samples["reference"]) / len(items)
    ratio = t_ref / t_ours
    row = Row("loader window with document masking (doc ids + positions)", 1 / t_ours, 1 / t_ref,
              "windows/s", ratio, "> 1× (no issue target)", ratio > 1.0,
              f"{n_tokens:,} tokens in {n_docs:,} documents, seq_len {SEQ}, {len(items)} windows per sample; "
              "reference: the offset table copied to int64 per window (the loader before 2026-11-24)",
              load, len(samples["ours"]))
    return emit([row], args)


if __name__ == "__main__":
    raise SystemExit(main())
