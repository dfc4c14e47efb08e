"""The evaluate stage end to end on tiny exports: scores, results JSON, reports, promotion, gate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from evalkit import eval_config, write_validation_shards

from kubellm.core.manifest import read_manifest
from kubellm.core.storage import storage_for
from kubellm.evaluate import stage
from kubellm.evaluate.registry import GateFailedError, Registry


def test_stage_scores_reports_and_promotes(model_artifacts, tmp_path: Path) -> None:
    root, (base, sft) = model_artifacts
    tokens = write_validation_shards(root, Path(base.uri))
    cfg = eval_config(gate={"rules": {"kubellm_knowledge": {"max_drop": 0.5}}})
    m = stage.run(cfg, {"models": f"{base.uri},mine:{sft.uri}", "tokens": tokens.uri}, root)

    assert m.kind == "eval" and read_manifest(m.uri).digest() == m.digest()
    results = json.loads(storage_for(m.uri).read_bytes(m.file_uri("results.json")))
    labels = [x["label"] for x in results["models"]]
    assert labels == ["pretrain", "mine"]  # default label from the producing stage; explicit label kept
    assert [x["digest"] for x in results["models"]] == [base.digest(), sft.digest()]
    for model in results["models"]:
        s = model["scores"]
        assert 0.0 <= s["kubellm_knowledge"]["acc"] <= 1.0 and 0.0 <= s["kubellm_preference"]["acc"] <= 1.0
        # random weights never answer in the chat format
        assert s["kubellm_format"]["format_ok"] == s["kubellm_format"]["correct"] == 0.0
        # a random-init model is close to uniform over the vocabulary
        assert 0.5 * model_vocab(base) < s["perplexity"]["perplexity"] < 2.0 * model_vocab(base)
        assert s["perplexity"]["tokens"] > 50
    assert results["tasks"]["kubellm_format"]["chat"] and not results["tasks"]["kubellm_knowledge"]["chat"]
    assert results["tasks"]["kubellm_knowledge"]["version"] == 1.0
    assert results["tasks"]["kubellm_knowledge"]["n_samples"] == 4  # limit
    assert results["harness"]["lm_eval"] == "0.4.13"
    # the two random models differ, and the report shows it
    assert results["models"][0]["scores"]["perplexity"] != results["models"][1]["scores"]["perplexity"]

    # KFP Metrics: headline numbers
    assert m.metrics["mine/kubellm_knowledge/acc"] == results["models"][1]["scores"]["kubellm_knowledge"]["acc"]
    assert "pretrain/perplexity/perplexity" in m.metrics and m.metrics["gate_passed"] == 1.0
    # reports
    md = m.report_markdown or ""
    assert "| model | kubellm_knowledge (acc) | kubellm_format (format_ok) | kubellm_preference (acc)" in md and "| mine |" in md
    html = storage_for(m.uri).read_bytes(m.file_uri("report.html")).decode()
    assert html.count("data:image/png;base64,") == 3  # loss curves, score per stage, perplexity
    assert "src='http" not in html and "<script" not in html  # self-contained

    # first promotion: the pointer names the candidate (the last model)
    cur = Registry(f"{root}/registry", "kubellm").current()
    assert cur is not None and cur.entry.model_digest == sft.digest() and cur.entry.label == "mine"
    assert cur.entry.eval_uri == m.uri
    assert cur.entry.scores["kubellm_knowledge"]["acc"] == results["models"][1]["scores"]["kubellm_knowledge"]["acc"]

    # second run: candidate = pretrain model; a floor it cannot reach fails the gate, pointer stays put
    etag = cur.etag
    strict = eval_config(gate={"candidate": "pretrain",
                               "rules": {"kubellm_format": {"min": 0.9}, "kubellm_knowledge": {"max_drop": 1.0}}})
    with pytest.raises(GateFailedError) as e:
        stage.run(strict, {"models": f"{base.uri},mine:{sft.uri}"}, root)
    msg = str(e.value)
    assert "kubellm_format format_ok 0.0000 must be ≥ 0.9000" in msg and "pretrain" in msg
    after = Registry(f"{root}/registry", "kubellm").current()
    assert after is not None and after.etag == etag and after.entry.model_digest == sft.digest()
    # the failing run still published its (complete) report, with deltas against the baseline
    report_uri = msg.split("report: ")[1].strip()
    failed = json.loads(storage_for(report_uri).read_bytes(report_uri.replace("report.html", "results.json")))
    assert failed["gate"]["passed"] is False and failed["baseline"]["model_digest"] == sft.digest()
    assert failed["deltas"]["mine"]["kubellm_knowledge"] == 0.0


def model_vocab(manifest) -> int:
    return json.loads(Path(manifest.uri, "config.json").read_text())["vocab_size"]


def test_perplexity_matches_hf_loss(hf_exports, tmp_path: Path) -> None:
    """Token-weighted held-out perplexity equals exp(HF's own mean causal-LM loss) over the same tokens,
    also when documents are split into windows."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubellm.evaluate.perplexity import shard_perplexity
    from kubellm.tokenizer.shards import TokenShardReader

    tokens = write_validation_shards(str(tmp_path), hf_exports["a"])
    shard = Path(tokens.uri) / "validation" / "00000.tok"
    model = AutoModelForCausalLM.from_pretrained(hf_exports["a"], dtype=torch.float32)
    r = TokenShardReader(shard)
    nll, n = 0.0, 0
    for d in range(r.doc_count):
        ids = torch.tensor(r.document(d), dtype=torch.long)[None]
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        nll += float(loss) * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    got = shard_perplexity(model, [shard], seq_len=1024, batch_size=2)
    assert got["tokens"] == n
    assert math.isclose(got["perplexity"], math.exp(nll / n), rel_tol=1e-5)
    windowed = shard_perplexity(model, [shard], seq_len=16, batch_size=3)
    assert windowed["tokens"] == n  # every token predicted once
    assert windowed["perplexity"] > 1.0
    capped = shard_perplexity(model, [shard], seq_len=16, batch_size=3, max_tokens=20)
    assert capped["tokens"] == 20


def test_stage_on_s3(hf_exports, s3_bucket: str) -> None:
    """Model artifact fetched from S3 (sha256-verified), eval artifact and pointer written to S3."""
    from evalkit import publish_model

    root = f"{s3_bucket}/kubellm"
    log = [{"step": i, "loss": 5.0 - 0.1 * i, "lr": 1e-3} for i in range(1, 11)]
    model = publish_model(hf_exports["a"], root, "dpo", metrics_jsonl=log)
    assert {f.path for f in model.files} >= {"hf/config.json", "metrics/metrics.jsonl"}
    cfg = eval_config(tasks=["kubellm_knowledge"], chat_tasks=[], limit=3,
                      gate={"rules": {"kubellm_knowledge": {"min": 0.0}}})
    m = stage.run(cfg, {"models": model.uri}, root)
    assert m.uri.startswith(f"{root}/evaluate/") and m.metrics["gate_passed"] == 1.0
    assert set(m.metrics) == {"dpo/kubellm_knowledge/acc", "gate_passed"}
    cur = Registry(f"{root}/registry", "kubellm").current()
    assert cur is not None and cur.entry.model_uri == model.uri and cur.entry.label == "dpo"
    # the same run again is content-addressed to the same prefix; the baseline is now itself: Δ = 0
    again = stage.run(cfg, {"models": model.uri, "baseline": cur.uri}, root)
    results = json.loads(storage_for(again.uri).read_bytes(again.file_uri("results.json")))
    assert results["deltas"] == {"dpo": {"kubellm_knowledge": 0.0}} and results["baseline"]["same_settings"]
    assert results["models"][0]["loss_curve"][:2] == [[1.0, 4.9], [2.0, 4.8]]  # from metrics/metrics.jsonl

    # a pointer that does not exist yet (what the pipelines pass as `pointer`): the first promotion
    # lands where it names, and the default registry is left alone
    before = Registry(f"{root}/registry", "kubellm").current()
    prod = f"{s3_bucket}/prod-registry/kubellm/promoted.json"
    stage.run(cfg, {"models": model.uri, "pointer": prod}, root)
    first = Registry.from_pointer(prod).current()
    assert first is not None and first.entry.model_uri == model.uri
    after = Registry(f"{root}/registry", "kubellm").current()
    assert before is not None and after is not None and after.etag == before.etag


def test_a_gate_without_rules_promotes_with_a_warning_and_the_presets_ship_rules(
        hf_exports, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A gate with no rules promotes whatever the candidate scores; it says so, and the shipped presets
    (the demo's among them) judge the bundled tasks against the promoted model."""
    from evalkit import publish_model

    from kubellm.runconfig import load_run_config

    model = publish_model(hf_exports["a"], str(tmp_path), "dpo")
    cfg = eval_config(tasks=["kubellm_knowledge"], chat_tasks=[], limit=2)
    with caplog.at_level("WARNING", logger="kubellm.evaluate.stage"):
        m = stage.run(cfg, {"models": model.uri}, str(tmp_path))
    assert m.metrics["gate_passed"] == 1.0
    assert "evaluate.gate.rules is empty: dpo is promoted whatever it scores" in caplog.text
    for preset in ("debug", "seed"):
        rules = load_run_config(preset=preset).evaluate.gate.rules
        assert set(rules) == {"kubellm_knowledge", "kubellm_format", "kubellm_preference"}
        assert all(r.max_drop is not None for r in rules.values())
