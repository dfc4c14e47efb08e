"""Helpers for the evaluate tests: tiny HF `LlamaForCausalLM` exports (random init, byte-level BPE
tokenizer with a chat template, the format `kubellm.model.hf.export_hf` writes), model artifacts,
validation token shards and fixture eval items."""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = 384) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B",
                                                       special_tokens=[("<|bos|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>",
                                   additional_special_tokens=SPECIALS[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def corpus() -> list[str]:
    import json

    from kubellm.evaluate.taskdata import DEFAULT_DATA_DIR

    texts = []
    for name in ("knowledge", "format", "preference"):
        for line in (DEFAULT_DATA_DIR / f"{name}.jsonl").read_text().splitlines():
            texts.append(line)
            texts.extend(str(v) for v in json.loads(line).values())
    texts += [f"The number {i} plus {j} is {i + j}." for i in range(12) for j in range(12)]
    return texts


def build_export(out_dir: Path, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """A random-init 2-layer Llama with a 384-token vocabulary (about 0.1M parameters)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        build_tokenizer(out_dir, corpus())
    else:
        for p in Path(tokenizer_dir).iterdir():
            if p.name.startswith("tokenizer") or p.name == "special_tokens_map.json" or p.name.endswith(".jinja"):
                shutil.copy(p, out_dir / p.name)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir




def publish_model(export: Path, root: str, stage: str, loss_curve: list[list[float]] | None = None,
                  metrics_jsonl: list[dict] | None = None):
    """A `model` artifact. With `metrics_jsonl`, the layout the model stages publish: `hf/` (the
    export, `metadata.export_path`) + `metrics/metrics.jsonl`; otherwise the export at the root."""
    import shutil
    import tempfile

    from kubellm.core.manifest import content_prefix, publish_dir, stable_hash

    prefix = content_prefix(root, stage, stable_hash([str(export), loss_curve, metrics_jsonl]), {})
    meta: dict = {"loss_curve": loss_curve} if loss_curve else {}
    if metrics_jsonl is None:
        return publish_dir(export, prefix, kind="model", metadata=meta)
    with tempfile.TemporaryDirectory() as d:
        shutil.copytree(export, Path(d) / "hf")
        write_jsonl(Path(d) / "metrics" / "metrics.jsonl", metrics_jsonl)
        return publish_dir(d, prefix, kind="model", metadata=meta | {"export_path": "hf", "stage": stage})


def write_validation_shards(root: str, tok_dir: Path, *, with_tokenizer: bool = False,
                            texts: tuple[str, ...] | None = None, name: str = "val0") -> object:
    """A token_shards artifact whose validation shard holds two documents of the eval texts (or
    `texts`; none: an empty shard). `with_tokenizer`: also ship `tokenizer/` (as the tokenizer stage
    does, `metadata.tokenizer_dir`)."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    from kubellm.core.manifest import publish_dir
    from kubellm.tokenizer.shards import TokenShardWriter

    if texts is None:
        texts = ("The number 3 plus 4 is 7.", "What colour is the zorbel? The zorbel is blue. " * 8)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    meta: dict = {"vocab_size": len(tok)}
    with tempfile.TemporaryDirectory() as d:
        w = TokenShardWriter(Path(d) / "validation" / "00000.tok", vocab_size=len(tok))
        for text in texts:
            w.add_document([tok.bos_token_id] + tok.encode(text, add_special_tokens=False) + [tok.eos_token_id])
        w.close()
        if with_tokenizer:
            (Path(d) / "tokenizer").mkdir()
            for p in Path(tok_dir).iterdir():
                if p.name.startswith("tokenizer") or p.name == "special_tokens_map.json" or p.name.endswith(".jinja"):
                    shutil.copy(p, Path(d) / "tokenizer" / p.name)
            meta["tokenizer_dir"] = "tokenizer"
        return publish_dir(d, f"{root}/tokenizer/{name}", kind="token_shards", metadata=meta)


def eval_config(**over: object):
    from kubellm.evaluate.config import EvaluateConfig

    base = {"limit": 4, "bootstrap_iters": 10, "batch_size": 4, "device": "cpu", "dtype": "float32"}
    return EvaluateConfig.model_validate(base | over)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path



class FakeHarness:
    """Stands in for lm-eval in stage tests that are about the stage's own logic (gate direction,
    settings, reports): `load_model` returns the export dir (`.path`), `evaluate_lm` returns the scores given
    for that dir's name (`scores[name]`: task -> metric -> value), with `directions` as lm-eval's
    `higher_is_better`, `versions` and `configs` (lm-eval's dumped task configs). Every call is recorded."""

    def __init__(self, scores: dict, directions: dict | None = None, versions: dict | None = None,
                 configs: dict | None = None) -> None:
        self.scores, self.directions = scores, directions or {}
        self.versions, self.configs = versions or {}, configs or {}
        self.calls: list[tuple[str, list[str]]] = []

    def install(self, monkeypatch) -> FakeHarness:  # noqa: ANN001
        from kubellm.evaluate import harness

        monkeypatch.setattr(harness, "task_manager", lambda tasks, data_dir: None)
        from types import SimpleNamespace

        monkeypatch.setattr(harness, "load_model", lambda model_dir, cfg: SimpleNamespace(path=Path(model_dir), model=None))
        monkeypatch.setattr(harness, "evaluate_lm", self.evaluate_lm)
        return self

    def evaluate_lm(self, lm, cfg, tm, tasks=None):  # noqa: ANN001, ANN201
        from kubellm.evaluate.harness import HarnessResult

        tasks = list(tasks if tasks is not None else cfg.tasks)
        self.calls.append((lm.path.name, tasks))
        mine = self.scores[lm.path.name]
        chat = set(cfg.chat_tasks)
        return HarnessResult(
            scores={t: dict(mine[t]) for t in tasks},
            versions={t: self.versions.get(t, 1.0) for t in tasks},
            n_shot={t: cfg.num_fewshot or 0 for t in tasks},
            n_samples={t: cfg.limit or 10 for t in tasks},
            chat={t: t in chat for t in tasks},
            higher_is_better={t: dict(self.directions.get(t, {})) for t in tasks},
            configs={t: dict(self.configs.get(t, {"task": t})) for t in tasks},
        )
