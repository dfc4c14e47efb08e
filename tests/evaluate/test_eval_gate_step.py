"""The gate as its own step (what the pipelines run): the evaluate stage with apply_gate=False publishes
the report and the verdict and succeeds whatever the verdict; registry.apply_gate then fails naming
the rules, or moves the pointer — only if it still names the baseline the evaluation compared
against, and idempotently when a retried step finds its own promotion already done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from evalkit import FakeHarness, eval_config

from kubellm.core.storage import storage_for
from kubellm.evaluate import stage
from kubellm.evaluate.registry import GateFailedError, PromotionConflictError, Registry, apply_gate

DIRS = {"wmt": {"acc": True}}


def _cfg(**gate: object):  # noqa: ANN202
    return eval_config(tasks=["wmt"], chat_tasks=[], gate={"rules": {"wmt": {"metric": "acc", "min": 0.5}}} | gate)


def test_failed_gate_publishes_and_succeeds_then_the_gate_step_fails(hf_exports, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    FakeHarness({"a": {"wmt": {"acc": 0.2}}}, DIRS).install(monkeypatch)
    root = str(tmp_path / "art")
    m = stage.run(_cfg(), {"models": str(hf_exports["a"])}, root, apply_gate=False)  # before: GateFailedError
    assert m.metadata["gate_passed"] is False and m.metrics["gate_passed"] == 0.0
    assert "## Gate (a): FAILED" in (m.report_markdown or "")
    assert storage_for(m.uri).exists(m.file_uri("report.html"))
    with pytest.raises(GateFailedError, match=r"promotion gate FAILED for a: wmt acc 0.2000 must be ≥ 0.5000\. The "
                                              r"promoted pointer .*promoted.json was not moved; report: .*report.html"):
        apply_gate(m)
    assert Registry(f"{root}/registry", "kubellm").current() is None


def test_gate_step_promotes_once_and_refuses_a_moved_pointer(hf_exports, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    FakeHarness({"a": {"wmt": {"acc": 0.6}}, "b": {"wmt": {"acc": 0.7}}}, DIRS).install(monkeypatch)
    root = str(tmp_path / "art")
    reg = Registry(f"{root}/registry", "kubellm")
    m = stage.run(_cfg(), {"models": str(hf_exports["a"])}, root, apply_gate=False)
    assert reg.current() is None  # evaluate alone never moves the pointer
    assert apply_gate(m, promote=False) is None and reg.current() is None  # the report's gate step
    entry = apply_gate(m)
    cur = reg.current()
    assert entry is not None and cur.entry.label == "a" and cur.entry.eval_uri == m.uri
    assert cur.entry.task_versions == {"wmt": 1.0} and "wmt" in cur.entry.eval_settings
    assert apply_gate(m).label == "a" and reg.current().etag == cur.etag  # a retried gate step: done already
    # b evaluated against a; before its gate step runs another evaluation promotes something else
    mb = stage.run(_cfg(), {"models": str(hf_exports["b"])}, root, apply_gate=False)
    assert json.loads(storage_for(mb.uri).read_bytes(mb.file_uri("results.json")))["gate"]["baseline_digest"] == \
        cur.entry.model_digest
    reg.promote(cur.entry.model_copy(update={"model_digest": "x" * 64, "label": "other"}), cur)
    with pytest.raises(PromotionConflictError, match=r"the promoted pointer moved after this evaluation read it .*"
                                                     r"b was NOT promoted"):
        apply_gate(mb)
    assert reg.current().entry.label == "other"


def test_the_gate_applies_only_the_verdict_as_committed(hf_exports, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """results.json replaced after the commit (a racing writer, a store without conditional writes) with a
    passing verdict: the gate refuses it by its sha256 instead of promoting a model that failed."""
    from kubellm.core.errors import IntegrityError

    FakeHarness({"a": {"wmt": {"acc": 0.2}}}, DIRS).install(monkeypatch)
    root = str(tmp_path / "art")
    m = stage.run(_cfg(), {"models": str(hf_exports["a"])}, root, apply_gate=False)
    results = Path(m.uri) / "results.json"
    doc = json.loads(results.read_text())
    doc["gate"]["passed"] = True
    results.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match=r"results\.json: .* do not match the manifest"):
        apply_gate(m)
    assert Registry(f"{root}/registry", "kubellm").current() is None
