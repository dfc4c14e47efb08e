"""Tokenizing the corpus into token shards: the tokenizer stage's encode+write path
(`kubellm.tokenizer.stage.encode_split`: parquet batches -> `encode_batch_fast` -> `TokenShardWriter`)
against bare `Tokenizer.encode_batch_fast` — the same encoder call the stage makes (on the same
`corpus_encoder` copy, which reads special-token strings as text), in the same batch size — over the same texts already in memory (the ceiling: no parquet read, no id conversion, no shard
write), and against a per-document Python loop (`encode(text)` on the same copy + `add_document`, the naive way
to write the same shards).

    python -m bench.bench_tokenize            # demo-world corpus (scale 2), 5 alternating repeats
    python -m bench.bench_tokenize --quick    # smoke run

Targets (issue 12): ours ≥ 0.8× the ceiling, ≥ 3× the loop.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import Row, alternate, at_least, emit, load_avg, median, parser, repeats, timed


def build_corpus(tmp: Path, scale: float) -> tuple[list[Path], list[str]]:
    """Demo-world corpus documents as parquet `text` files (the data-prep stage's output format)."""
    from kubellm.data_prep.demo_world import generate

    paths = generate(tmp / "world", seed=0, scale=scale)
    texts = [json.loads(line)["text"] for f in sorted(Path(paths["corpus"]).glob("*.jsonl"))
             for line in f.read_text().splitlines() if line.strip()]
    files = []
    per_file = max(1, len(texts) // 4)
    for i in range(0, len(texts), per_file):
        f = tmp / "data" / f"part-{i // per_file:05d}.parquet"
        f.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": texts[i : i + per_file]}), f)
        files.append(f)
    return files, texts


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    from kubellm.tokenizer.bpe import special_tokens, train_bpe
    from kubellm.tokenizer.config import TokenizerConfig
    from kubellm.tokenizer.shards import TokenShardWriter
    from kubellm.tokenizer.stage import corpus_encoder, encode_split

    load = load_avg()
    with tempfile.TemporaryDirectory(prefix="kubellm-bench-tok-") as t:
        tmp = Path(t)
        files, texts = build_corpus(tmp, 0.2 if args.quick else 2.0)
        cfg = TokenizerConfig(vocab_size=2048)
        tok = train_bpe(iter(texts), cfg)
        vocab = tok.get_vocab_size()
        ids = {s: tok.token_to_id(s) for s in special_tokens(cfg)}
        bos, eos = ids[cfg.bos_token], ids[cfg.eos_token]
        nbytes = sum(len(x.encode("utf-8")) for x in texts)
        # the stage encodes corpus text with a copy that reads special-token strings as text: the
        # ceiling and the loop use the same copy, so all three run the same encoder
        enc = corpus_encoder(tok)

        def ours() -> None:
            encode_split(tok, files, tmp / "ours", "train", cfg, vocab, bos, eos)

        def ceiling() -> None:
            for i in range(0, len(texts), cfg.batch_size):
                enc.encode_batch_fast(texts[i : i + cfg.batch_size], add_special_tokens=False)

        def loop() -> None:
            w = TokenShardWriter(tmp / "loop.tok", vocab)
            for text in texts:
                w.add_document([bos, *enc.encode(text, add_special_tokens=False).ids, eos])
            w.close()

        samples = alternate({"ours": timed(ours), "ceiling": timed(ceiling), "loop": timed(loop)},
                            repeats(args))
    mb = nbytes / 1e6
    t_ours, t_ceil, t_loop = (median(samples[k]) for k in ("ours", "ceiling", "loop"))
    rows = []
    r1 = t_ceil / t_ours
    met1, note1 = at_least(r1, 0.8)
    rows.append(Row("tokenize corpus → shards vs bare encode_batch_fast (ceiling)", mb / t_ours, mb / t_ceil, "MB/s",
                    r1, "≥ 0.8×", met1, f"{len(texts)} docs, {mb:.1f} MB. {note1}".strip(), load,
                    len(samples["ours"])))
    r2 = t_loop / t_ours
    met2, note2 = at_least(r2, 3.0)
    rows.append(Row("tokenize corpus → shards vs per-document Python loop", mb / t_ours, mb / t_loop, "MB/s",
                    r2, "≥ 3×", met2, note2, load, len(samples["ours"])))
    return emit(rows, args)


if __name__ == "__main__":
    raise SystemExit(main())
