"""A model whose scores are nan (diverged weights): the eval artifact stays readable strict JSON,
the report shows the nan, and the gate never promotes it (the pointer would be unreadable)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from evalkit import eval_config, write_validation_shards

from kubellm.core.manifest import read_manifest
from kubellm.core.storage import storage_for
from kubellm.evaluate import stage
from kubellm.evaluate.perplexity import shard_perplexity
from kubellm.evaluate.registry import GateFailedError, Registry, judge


@pytest.fixture(scope="module")
def nan_export(hf_exports, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("nan") / "diverged"
    shutil.copytree(hf_exports["a"], out)
    sd = load_file(out / "model.safetensors")
    sd = {k: torch.full_like(v, float("nan")) if "norm" in k else v for k, v in sd.items()}
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_nan_scores_are_published_readably_and_never_promoted(hf_exports, nan_export: Path, tmp_path: Path) -> None:
    root = str(tmp_path / "art")
    tokens = write_validation_shards(root, hf_exports["a"])
    # no rules at all: before the fix the diverged model was promoted, the pointer held nulls that
    # no later run could read, and the eval manifest itself failed validation
    with pytest.raises(GateFailedError, match=r"perplexity perplexity is nan: a model with a non-finite score "
                                              r"is never promoted.*was not moved"):
        stage.run(eval_config(tasks=["kubellm_knowledge"], limit=2),
                  {"models": str(nan_export), "tokens": tokens.uri}, root)
    assert Registry(f"{root}/registry", "kubellm").current() is None
    [mpath] = Path(root, "evaluate").rglob("_manifest.json")
    m = read_manifest(str(mpath.parent))  # readable: no null in its float metrics
    assert m.metadata["gate_passed"] is False and "diverged/perplexity/perplexity" not in m.metrics
    raw = storage_for(m.uri).read_bytes(m.file_uri("results.json")).decode()
    results = json.loads(raw, parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))
    assert results["models"][0]["scores"]["perplexity"]["perplexity"] is None
    assert "| diverged | " in (m.report_markdown or "") and "nan" in (m.report_markdown or "")


def test_judge_fails_non_finite_scores_but_not_stderr() -> None:
    v = judge({"t": {"acc": 0.5, "acc_stderr": math.nan}, "perplexity": {"perplexity": math.inf}}, None, {}, {})
    assert not v.passed and [(c.task, c.metric, c.kind) for c in v.failures] == [("perplexity", "perplexity", "finite")]
    assert judge({"t": {"acc": 0.5, "acc_stderr": math.nan}}, None, {}, {}).passed


def test_perplexity_overflow_is_inf_not_a_crash(tmp_path: Path) -> None:
    import torch

    from kubellm.tokenizer.shards import TokenShardWriter

    class Huge(torch.nn.Module):  # puts all mass on token 0; the shard only holds token 1
        config = type("C", (), {"vocab_size": 4})()

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201
            logits = torch.zeros(*input_ids.shape, 4)
            logits[..., 0] = 1e4
            return type("O", (), {"logits": logits})()

    w = TokenShardWriter(tmp_path / "v.tok", vocab_size=4)
    w.add_document([1, 1, 1])
    w.close()
    out = shard_perplexity(Huge(), [tmp_path / "v.tok"])
    assert out["perplexity"] == math.inf and out["nll"] > 700
