"""Evaluation: the evaluate stage (`kubellm evaluate`: lm-eval in-process plus the report)
against the `lm_eval` command line on the same HF export and tasks, timed alternately. Scores
must be identical.

    python -m bench.bench_eval            # bundled kubellm_knowledge + kubellm_preference, every item
    python -m bench.bench_eval --quick    # limit 6

Export: the `seed` preset (`debug` with --quick; random init) with a byte-level BPE tokenizer trained on the demo world,
written by `kubellm.model.hf.export_hf`. Target (issue 12): ≥ 0.95× the CLI's speed, identical scores.
Both sides run as a process (`kubellm evaluate --config ...` vs `lm_eval ...`), start-up included:
that is what a user waits for. Start-up weighs a lot at this size (the CLI indexes every built-in
lm-eval task on each start; the stage indexes only the tasks it names), so the row also reports each
side's start-up, measured in the same run as a `--limit 1` run of the same command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Row, alternate, at_least, emit, load_avg, median, parser, repeats

TASKS = ["kubellm_knowledge", "kubellm_preference"]


def build_export(tmp: Path, preset: str = "debug") -> Path:
    import torch

    from kubellm.data_prep.demo_world import generate
    from kubellm.model import Transformer
    from kubellm.model.config import get_preset
    from kubellm.model.hf import export_hf
    from kubellm.tokenizer.bpe import save_hf_tokenizer, train_bpe
    from kubellm.tokenizer.config import TokenizerConfig

    paths = generate(tmp / "world", seed=0, scale=0.2)
    texts = [json.loads(line)["text"] for f in sorted(Path(paths["corpus"]).glob("*.jsonl"))
             for line in f.read_text().splitlines() if line.strip()]
    tcfg = TokenizerConfig(vocab_size=1024)
    tok = train_bpe(iter(texts), tcfg)
    save_hf_tokenizer(tok, tcfg, tmp / "tokenizer")
    cfg = get_preset(preset).with_(vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    export_hf(Transformer(cfg), cfg, tmp / "export", tokenizer_dir=tmp / "tokenizer")
    return tmp / "export"


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    from kubellm.evaluate.config import EvaluateConfig
    from kubellm.evaluate.taskdata import TASKS_DIR

    limit = 6 if args.quick else None  # None: every item of the tasks
    preset = "debug" if args.quick else "seed"  # seed: enough model for evaluation to weigh beside start-up
    load = load_avg()
    scores: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="kubellm-bench-eval-") as t:
        tmp = Path(t)
        export = build_export(tmp, preset)
        n = [0]
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

        def ours(lim: int | None, key: str) -> float:
            # the stage's own command (what a pipeline step runs): a process, like the CLI it is timed against
            n[0] += 1
            cfg = EvaluateConfig.model_validate({"tasks": TASKS, "chat_tasks": [], "limit": lim, "batch_size": 8,
                                                 "device": "cpu", "dtype": "float32", "bootstrap_iters": 0,
                                                 "gate": {"enabled": False}})
            run_cfg = tmp / f"run{n[0]}.yaml"
            run_cfg.write_text(json.dumps({"evaluate": cfg.model_dump(mode="json")}))  # JSON is YAML
            mf = tmp / f"manifest{n[0]}.json"
            t0 = time.perf_counter()
            subprocess.run([str(Path(sys.executable).with_name("kubellm")), "evaluate", "--config", str(run_cfg),
                            "--input", f"models=bench:{export}", "--output", str(tmp / f"art{n[0]}"),
                            "--manifest-out", str(mf)],
                           check=True, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
            dt = time.perf_counter() - t0
            uri = json.loads(mf.read_text())["uri"]
            scores[key] = json.loads((Path(uri) / "results.json").read_text())["models"][0]["scores"]
            return dt

        def cli(lim: int | None, key: str) -> float:
            n[0] += 1
            out = tmp / f"cli{n[0]}"
            t0 = time.perf_counter()
            subprocess.run([str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args",
                            f"pretrained={export},dtype=float32", "--tasks", ",".join(TASKS), "--include_path",
                            str(TASKS_DIR), "--batch_size", "8", "--seed", "1234", "--device", "cpu",
                            "--output_path", str(out), *(["--limit", str(lim)] if lim is not None else [])],
                           check=True, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
            dt = time.perf_counter() - t0
            (res,) = out.rglob("results_*.json")
            scores[key] = json.loads(res.read_text())["results"]
            return dt

        fns = {"ours": lambda: ours(limit, "ours"), "cli": lambda: cli(limit, "cli")}
        if limit is None:  # the start-up baseline: meaningless against a --quick run of a few items
            fns.update(ours_start=lambda: ours(1, "ours_start"), cli_start=lambda: cli(1, "cli_start"))
        samples = alternate(fns, repeats(args))
    same = all(scores["cli"][task][f"{k},none"] == scores["ours"][task][k] for task in TASKS for k in ("acc", "acc_norm"))
    t_ours, t_cli = median(samples["ours"]), median(samples["cli"])
    ratio = t_cli / t_ours
    met, note = at_least(ratio, 0.95)
    detail = "; ".join(f"{task} acc {scores['ours'][task]['acc']:.3f}" for task in TASKS)
    items = "every item" if limit is None else f"limit {limit}"
    startup = ""
    if "ours_start" in samples:  # how much of each side's time is start-up: a --limit 1 run of the same command
        s_ours, s_cli = median(samples["ours_start"]), median(samples["cli_start"])
        startup = (f" Most of it is start-up, not evaluation: a --limit 1 run takes ours {s_ours:.1f} s, the CLI "
                   f"{s_cli:.1f} s (the CLI indexes every built-in lm-eval task on each start; the stage only the "
                   "tasks it names); the bundled tasks are too small for the remainder to be timed apart from noise.")
    rows = [Row("evaluate stage vs lm_eval CLI (wall time → speed ratio)", 1 / t_ours, 1 / t_cli, "runs/s", ratio,
                "≥ 0.95×", met, f"{len(TASKS)} bundled tasks, {items}, batch 8, {preset} export, process start-up "
                f"included (ours {t_ours:.1f} s, CLI {t_cli:.1f} s).{startup} {note}".strip(), load,
                len(samples["ours"]))]
    return emit([
        *rows,
        Row("evaluate stage vs lm_eval CLI: scores identical", 1.0 if same else 0.0, 1.0, "bool",
            1.0 if same else 0.0, "identical", same, detail, load, len(samples["ours"])),
    ], args)


if __name__ == "__main__":
    raise SystemExit(main())
