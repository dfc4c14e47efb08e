"""The gate compares like with like. Each task's settings (task version, a hash of its config as lm-eval
ran it, eval data content, limit, n-shot, chat, seed, dtype, lm-eval version; held-out perplexity on its
own: tokens digest, window) are recorded in results.json and in the promoted pointer. A max_drop rule
whose baseline score came from other settings re-scores the promoted model in this run; tasks no
max_drop rule needs are only flagged. An s3:// eval_dir hashes content, not its temp copy's path.
A run that never promotes skips a perplexity rule it has no tokens for, and says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from evalkit import FakeHarness, eval_config, write_validation_shards

from kubellm.core.errors import ConfigError, InputDataError
from kubellm.core.storage import storage_for
from kubellm.evaluate import stage
from kubellm.evaluate.config import GateRule
from kubellm.evaluate.registry import GateFailedError, Promoted, Registry, judge

DIRS = {"wmt": {"acc": True}, "kubellm_knowledge": {"acc": True, "acc_norm": True}}
RULES = {"rules": {"wmt": {"metric": "acc", "max_drop": 0.05}}}


def _results(m) -> dict:  # noqa: ANN001
    return json.loads(storage_for(m.uri).read_bytes(m.file_uri("results.json")))


def _promote_a(hf_exports, root: str, monkeypatch: pytest.MonkeyPatch, acc: float = 0.9) -> Promoted:
    FakeHarness({"a": {"wmt": {"acc": acc}}}, DIRS).install(monkeypatch)
    stage.run(eval_config(tasks=["wmt"], chat_tasks=[], gate=RULES), {"models": str(hf_exports["a"])}, root)
    return Registry(f"{root}/registry", "kubellm").current().entry


def test_pointer_records_task_versions_and_settings(hf_exports, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = _promote_a(hf_exports, str(tmp_path / "art"), monkeypatch)
    assert entry.task_versions == {"wmt": 1.0} and entry.lm_eval_version == "0.4.13"
    s = entry.eval_settings["wmt"]
    assert (s["version"], s["limit"], s["n_shot"], s["chat"], s["lm_eval"], s["dtype"]) == \
        (1.0, 4, 0, False, "0.4.13", "float32")
    assert len(s["config"]) == 64 and entry.eval_settings_hash


@pytest.mark.parametrize(("change", "differs"), [
    ({"versions": {"wmt": 2.0}}, "version 1.0 → 2.0"),
    ({"configs": {"wmt": {"task": "wmt", "doc_to_text": "Q: {{q}}"}}}, "config "),
])
def test_max_drop_against_other_settings_rescores_the_promoted_model(hf_exports, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     change: dict, differs: str) -> None:
    root = str(tmp_path / "art")
    _promote_a(hf_exports, root, monkeypatch, acc=0.9)  # a scored 0.9 under the old settings
    # under the new settings a scores 0.5 and b 0.48: against the pointer's 0.9 b would "drop" by 0.42
    fake = FakeHarness({"a": {"wmt": {"acc": 0.5}}, "b": {"wmt": {"acc": 0.48}}}, DIRS, **change).install(monkeypatch)
    m = stage.run(eval_config(tasks=["wmt"], chat_tasks=[], gate=RULES), {"models": str(hf_exports["b"])}, root)
    assert fake.calls == [("b", ["wmt"]), ("a", ["wmt"])]  # the promoted model (a), fetched and re-scored
    res = _results(m)
    assert res["gate"]["passed"] and res["baseline"]["scores"]["wmt"]["acc"] == 0.5
    assert res["baseline"]["same_settings"] and res["deltas"]["b"]["wmt"] == pytest.approx(-0.02)
    assert differs in res["baseline"]["rescored"]["wmt"]
    md = m.report_markdown or ""
    assert "Baseline wmt: re-scored in this run (the pointer's score came from other settings: " in md
    assert "Warning" not in md
    assert Registry(f"{root}/registry", "kubellm").current().entry.label == "b"


def test_a_task_added_since_the_promotion_is_rescored_for_max_drop(hf_exports, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The pointer was promoted on wmt; kubellm_knowledge is added with a max_drop rule: the promoted
    model is scored on that task alone in this run and the gate judges the drop (it used to stop the
    stage, unpublished, after every model had been evaluated)."""
    root = str(tmp_path / "art")
    _promote_a(hf_exports, root, monkeypatch, acc=0.9)
    fake = FakeHarness({"a": {"wmt": {"acc": 0.9}, "kubellm_knowledge": {"acc": 0.6}},
                        "b": {"wmt": {"acc": 0.9}, "kubellm_knowledge": {"acc": 0.4}}}, DIRS).install(monkeypatch)
    rules = {"rules": {"wmt": {"metric": "acc", "max_drop": 0.05},
                       "kubellm_knowledge": {"metric": "acc", "max_drop": 0.05}}}
    with pytest.raises(GateFailedError, match=r"kubellm_knowledge acc 0.4000 vs baseline 0.6000: dropped \(worse\)"):
        stage.run(eval_config(tasks=["wmt", "kubellm_knowledge"], chat_tasks=[], gate=rules),
                  {"models": str(hf_exports["b"])}, root)
    assert fake.calls == [("b", ["wmt", "kubellm_knowledge"]), ("a", ["kubellm_knowledge"])]
    assert Registry(f"{root}/registry", "kubellm").current().entry.label == "a"


def test_promoted_model_among_the_models_is_compared_by_its_fresh_scores(hf_exports, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path / "art")
    _promote_a(hf_exports, root, monkeypatch, acc=0.9)
    fake = FakeHarness({"a": {"wmt": {"acc": 0.5}}, "b": {"wmt": {"acc": 0.3}}}, DIRS,
                       versions={"wmt": 2.0}).install(monkeypatch)
    with pytest.raises(GateFailedError, match=r"wmt acc 0.3000 vs baseline 0.5000: dropped \(worse\) by 0.2000"):
        stage.run(eval_config(tasks=["wmt"], chat_tasks=[], gate=RULES),
                  {"models": f"{hf_exports['a']},{hf_exports['b']}"}, root)
    assert [c[0] for c in fake.calls] == ["a", "b"]  # no extra evaluation


def test_a_promoted_model_that_cannot_be_read_is_named(hf_exports, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path / "art")
    gone = tmp_path / "gone"
    shutil.copytree(hf_exports["a"], gone)
    FakeHarness({"gone": {"wmt": {"acc": 0.9}}}, DIRS).install(monkeypatch)
    stage.run(eval_config(tasks=["wmt"], chat_tasks=[], gate=RULES), {"models": str(gone)}, root)
    shutil.rmtree(gone)
    FakeHarness({"b": {"wmt": {"acc": 0.9}}}, DIRS, versions={"wmt": 2.0}).install(monkeypatch)
    with pytest.raises(InputDataError, match=r"max_drop rule\(s\) on \['wmt'\] compare against the promoted model "
                                             r"gone .*whose recorded scores came from other evaluation settings"):
        stage.run(eval_config(tasks=["wmt"], chat_tasks=[], gate=RULES), {"models": str(hf_exports["b"])}, root)
    assert Registry(f"{root}/registry", "kubellm").current().entry.label == "gone"


def test_other_settings_without_max_drop_are_flagged_not_rescored(hf_exports, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path / "art")
    _promote_a(hf_exports, root, monkeypatch)
    fake = FakeHarness({"b": {"wmt": {"acc": 0.5}}}, DIRS).install(monkeypatch)
    m = stage.run(eval_config(tasks=["wmt"], chat_tasks=[], limit=2, gate={"rules": {"wmt": {"min": 0.1}}}),
                  {"models": str(hf_exports["b"])}, root)
    assert fake.calls == [("b", ["wmt"])]
    assert "**Warning: the baseline's wmt score comes from different evaluation settings (limit 4 → 2)" in \
        (m.report_markdown or "")


def test_judge_refuses_max_drop_on_unlike_scores() -> None:
    base = Promoted(name="k", model_uri="/m", model_digest="d" * 64, scores={"wmt": {"acc": 0.5}})
    v = judge({"wmt": {"acc": 0.5}}, base, {"wmt": GateRule(max_drop=0.1)}, {"wmt": "acc"},
              directions=DIRS, unlike={"wmt": "limit 4 → 2"})
    assert not v.passed and v.failures[0].describe().startswith(
        "wmt acc: the baseline's score comes from other evaluation settings (limit 4 → 2); max_drop cannot compare")


def test_s3_eval_dir_hashes_content_not_the_temp_path(hf_exports, s3_bucket: str) -> None:
    from kubellm.evaluate.taskdata import DEFAULT_DATA_DIR

    ev = f"{s3_bucket}/evaldata"
    storage_for(ev).write_bytes(f"{ev}/knowledge.jsonl", (DEFAULT_DATA_DIR / "knowledge.jsonl").read_bytes())
    cfg = eval_config(tasks=["kubellm_knowledge"], chat_tasks=[], limit=1, eval_dir=ev, gate={"enabled": False})
    root = f"{s3_bucket}/art"
    one = stage.run(cfg, {"models": str(hf_exports["a"])}, root)
    two = stage.run(cfg, {"models": str(hf_exports["a"])}, root)
    assert one.uri == two.uri  # before the fix: a new prefix every run (the temp dir was in the hash)
    r = _results(two)
    assert r["tasks"]["kubellm_knowledge"]["data"]["uri"] == f"{ev}/knowledge.jsonl"
    assert "kubellm-eval-" not in json.dumps(r)
    # and the gate sees the same settings: no "unlike settings" warning against itself
    gated = eval_config(tasks=["kubellm_knowledge"], chat_tasks=[], limit=1, eval_dir=ev)
    stage.run(gated, {"models": str(hf_exports["a"])}, root)
    again = stage.run(gated, {"models": str(hf_exports["a"])}, root)
    assert _results(again)["baseline"]["same_settings"] and "Warning" not in (again.report_markdown or "")


def test_report_run_skips_a_perplexity_rule_without_tokens(hf_exports, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path / "art")
    rules = {"kubellm_knowledge": {"max_drop": 0.5}, "perplexity": {"max_drop": 5.0}}
    FakeHarness({"a": {"kubellm_knowledge": {"acc": 0.5}}}, DIRS).install(monkeypatch)
    monkeypatch.setattr(stage, "shard_perplexity", lambda *a, **k: {"perplexity": 40.0, "nll": 3.7, "tokens": 99.0})
    tokens = write_validation_shards(root, hf_exports["a"])
    cfg = eval_config(tasks=["kubellm_knowledge"], gate={"rules": rules})
    stage.run(cfg, {"models": str(hf_exports["a"]), "tokens": tokens.uri}, root)  # llm_from_scratch: with tokens
    # a run that may promote still needs tokens for its perplexity rule
    with pytest.raises(ConfigError, match=r"has a perplexity rule but no tokens input"):
        stage.run(cfg, {"models": str(hf_exports["a"])}, root)
    # the scheduled report (never promotes, no tokens): the rule is skipped and the report says so;
    # the knowledge score's settings are the same as the promotion's (perplexity's are hashed apart)
    report = eval_config(tasks=["kubellm_knowledge"], gate={"rules": rules, "promote": False})
    m = stage.run(report, {"models": str(hf_exports["a"])}, root)
    res = _results(m)
    assert res["gate"]["passed"] and set(res["gate"]["skipped"]) == {"perplexity"}
    assert res["baseline"]["same_settings"] and "Warning" not in (m.report_markdown or "")
    assert "- ⏭ perplexity rule skipped: no tokens input, so held-out perplexity was not measured" in \
        (m.report_markdown or "")
    assert set(res["task_settings"]) == {"kubellm_knowledge"}
