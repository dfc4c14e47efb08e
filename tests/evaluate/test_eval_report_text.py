"""The report with awkward model labels (a label is a directory name): literal in Markdown, escaped in
HTML, and never parsed as matplotlib mathtext."""

from __future__ import annotations

import math
import re

from kubellm.evaluate.report import render_html, render_markdown


def _results(labels: list[str], v: float = 0.5) -> dict:
    return {"columns": [["kubellm_knowledge", "acc"], ["perplexity", "perplexity"]],
            "models": [{"label": lbl, "uri": f"/m/{i}", "digest": "dir-abc",
                        "scores": {"kubellm_knowledge": {"acc": v, "acc_stderr": 0.1}, "perplexity": {"perplexity": v}},
                        "loss_curve": [[0, 2.0], [1, 1.0]]} for i, lbl in enumerate(labels)],
            "tasks": {}, "harness": {"lm_eval": "x", "transformers": "y", "torch": "z"}, "baseline": None,
            "gate": {"candidate": labels[-1], "passed": True, "promoted": False, "checks": []}}


def test_labels_are_literal_in_markdown_and_html() -> None:
    labels = ["<script>alert(1)<", "a|b", "cost$\\frac$"]
    md = render_markdown(_results(labels))
    row = next(line for line in md.splitlines() if line.startswith("| a"))
    assert row.startswith("| a\\|b | 0.5000") and row.count(" | ") == 2  # still three cells
    assert "<script" not in md and "&lt;script&gt;alert(1)&lt;" in md
    html = render_html(_results(labels))  # before the fix: matplotlib ValueError on `$\frac$`
    assert "<script" not in html and "&lt;script&gt;" in html and html.count("data:image/png;base64,") == 3


def test_nan_score_shows_as_nan() -> None:
    md = render_markdown(_results(["m"], math.nan))
    assert "| m | nan ± 0.100 | nan |" in md
    assert render_html(_results(["m"], math.nan)).count("data:image/png") == 3


def test_baseline_from_other_settings_is_flagged(hf_exports, tmp_path) -> None:
    """A baseline scored with other settings (here: limit 1 vs 2) is compared, but the report says so."""
    from evalkit import eval_config

    from kubellm.evaluate import stage

    root = str(tmp_path / "art")
    first = stage.run(eval_config(tasks=["kubellm_knowledge"], limit=1), {"models": str(hf_exports["a"])}, root)
    assert "Warning: the baseline" not in (first.report_markdown or "")
    same = stage.run(eval_config(tasks=["kubellm_knowledge"], limit=1), {"models": str(hf_exports["b"])}, root)
    assert "Warning: the baseline" not in (same.report_markdown or "")
    other = stage.run(eval_config(tasks=["kubellm_knowledge"], limit=2), {"models": str(hf_exports["a"])}, root)
    assert ("**Warning: the baseline's kubellm_knowledge score comes from different evaluation settings "
            "(limit 1 → 2): its Δ compares unlike numbers.**") in (other.report_markdown or "")


def test_missing_s3_eval_file_is_named_by_its_uri(hf_exports, s3_bucket: str) -> None:
    import pytest
    from evalkit import eval_config

    from kubellm.core.errors import InputDataError
    from kubellm.core.storage import storage_for
    from kubellm.evaluate import stage
    from kubellm.evaluate.taskdata import DEFAULT_DATA_DIR

    ev = f"{s3_bucket}/evaldata"
    storage_for(ev).write_bytes(f"{ev}/knowledge.jsonl", (DEFAULT_DATA_DIR / "knowledge.jsonl").read_bytes())
    cfg = eval_config(tasks=["kubellm_knowledge", "kubellm_format"], eval_dir=ev)
    with pytest.raises(InputDataError, match=rf"^{ev}/format.jsonl: eval data file for task kubellm_format not found"):
        stage.run(cfg, {"models": str(hf_exports["a"])}, f"{s3_bucket}/art")


def test_report_of_a_lost_promotion_race_does_not_claim_promoted(hf_exports, tmp_path, monkeypatch) -> None:
    import pytest
    from evalkit import eval_config

    from kubellm.evaluate import registry, stage

    def lose(self, entry, expected):  # noqa: ANN001, ANN202
        raise registry.PromotionConflictError("another gate moved the pointer")

    monkeypatch.setattr(registry.Registry, "promote", lose)
    root = str(tmp_path / "art")
    with pytest.raises(registry.PromotionConflictError):
        stage.run(eval_config(tasks=["kubellm_knowledge"], limit=1), {"models": str(hf_exports["a"])}, root)
    [md] = list((tmp_path / "art" / "evaluate").rglob("report.md"))
    text = md.read_text()
    assert "— promoted" not in text and "## Gate (a): PASSED — promoting: the pointer is moved after" in text


def _score_plot_ylim(monkeypatch, results: dict) -> tuple[float, float]:  # noqa: ANN001
    """The y-limits of the report's score plot (the second figure: loss curves come first)."""
    from kubellm.evaluate import report

    seen: list = []
    real = report._png
    monkeypatch.setattr(report, "_png", lambda fig: seen.append(fig.axes[0].get_ylim()) or real(fig))
    report.plots(results)
    return seen[1]


def test_score_plot_is_not_clipped_to_0_1_for_unbounded_scores(monkeypatch) -> None:  # noqa: ANN001
    """The debug preset's headline for preference is `margin` (nats, ~24 after DPO): the 0..1 limits
    drew it off the plot. Accuracies alone keep the full 0..1 range."""
    res = _results(["sft", "dpo"])
    res["columns"] = [["kubellm_knowledge", "acc"], ["kubellm_preference", "margin"]]
    for m, margin in zip(res["models"], (10.5, 24.1), strict=True):
        m["scores"]["kubellm_preference"] = {"margin": margin}
    low, high = _score_plot_ylim(monkeypatch, res)
    assert high >= 24.1 and low <= 0.5  # before the fix: (-0.02, 1.02)
    assert _score_plot_ylim(monkeypatch, _results(["a", "b"])) == (-0.02, 1.02)


def test_html_report_lists_the_tasks() -> None:
    res = _results(["m"])
    res["tasks"] = {"kubellm_knowledge": {"version": 1.0, "n_samples": 4, "n_shot": 0, "chat": False},
                    "kubellm_format": {"version": 1.0, "n_samples": 58, "n_shot": 0, "chat": True}}
    html = render_html(res)
    assert "<h2>Tasks</h2>" in html
    assert "<li><code>kubellm_knowledge</code> v1.0: 4 items, 0-shot, chat template off</li>" in html
    assert "<li><code>kubellm_format</code> v1.0: 58 items, 0-shot, chat template on</li>" in html
    assert "- `kubellm_format` v1.0: 58 items, 0-shot, chat template on" in render_markdown(res)
    # held-out perplexity counts tokens; a count lm-eval does not report (a group) is left out
    res["tasks"] = {"perplexity": {"version": 1, "n_samples": 2000, "n_shot": 0, "chat": False},
                    "mmlu": {"version": 2, "n_samples": 0, "n_shot": 5, "chat": False}}
    md = render_markdown(res)
    assert "- `perplexity` v1: 2000 tokens, 0-shot, chat template off" in md
    assert "- `mmlu` v2: 5-shot, chat template off" in md


def test_markdown_labels_and_uris_make_no_links_or_code_spans() -> None:
    """A label like `[x](javascript:alert(1))` was a link in the KFP Markdown viewer; a backtick in a URI
    ended its code span."""
    res = _results(["[x](javascript:alert(1))"])
    res["models"][0]["uri"] = "/m/odd`name"
    md = render_markdown(res)
    assert not re.search(r"(?<!\\)\]\(javascript", md) and "\\[x\\](javascript:alert(1))" in md
    assert "``/m/odd`name``" in md


def test_loss_curve_points_that_are_not_numbers_are_left_out_with_a_warning(tmp_path, caplog) -> None:  # noqa: ANN001
    """A null loss or a non-numeric step raised a bare TypeError/ValueError after the model was scored."""
    import json
    from types import SimpleNamespace

    from kubellm.evaluate.stage import ModelInput, loss_curve

    (tmp_path / "metrics").mkdir()
    rows = [{"step": 1, "loss": 2.0}, {"step": "x", "loss": 1.5}, {"step": 3, "loss": None}, {"step": 4, "loss": 1.0}]
    (tmp_path / "metrics/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING"):
        assert loss_curve(ModelInput("m", "r", root=tmp_path)) == [[1.0, 2.0], [4.0, 1.0]]
    assert "metrics.jsonl: 2 loss-curve point(s) are not (step, loss) numbers" in caplog.text
    meta = SimpleNamespace(metadata={"loss_curve": [[1, 2.0], [2, None], "junk", [3, 1.0]]})
    assert loss_curve(ModelInput("m", "r", manifest=meta, uri="s3://b/m")) == [[1.0, 2.0], [3.0, 1.0]]  # type: ignore[arg-type]
    assert "s3://b/m metadata.loss_curve: 2 loss-curve point(s)" in caplog.text
