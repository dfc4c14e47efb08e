"""Filtered metrics (`exact_match,strict-match`): the stderr of `exact_match/strict-match` is stored as
`exact_match/strict-match_stderr`, so the report shows its ±, a nan stderr is not taken for a score
(which would block promotion), and gate messages never list stderr entries as metrics."""

from __future__ import annotations

import math

import pytest

from kubellm.core.errors import InputDataError
from kubellm.evaluate.config import GateRule
from kubellm.evaluate.harness import parse_results
from kubellm.evaluate.metrics import harness_name, is_stderr
from kubellm.evaluate.registry import judge
from kubellm.evaluate.report import render_html, render_markdown

# what lm-eval 0.4.x returns for a generate_until task with two filters (gsm8k-style), one item: "N/A"
OUT = {"results": {"gsm": {"alias": "gsm", "exact_match,strict-match": 0.25,
                           "exact_match_stderr,strict-match": math.nan,
                           "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": 0.1,
                           "acc,none": 0.75, "acc_stderr,none": "N/A", "sample_len": 4}}}


def test_filtered_stderr_is_named_after_its_metric() -> None:
    scores = parse_results(OUT, ["gsm"])["gsm"]
    assert scores == {"exact_match/strict-match": 0.25, "exact_match/strict-match_stderr": scores[
        "exact_match/strict-match_stderr"], "exact_match/flexible-extract": 0.5,
        "exact_match/flexible-extract_stderr": 0.1, "acc": 0.75}
    assert math.isnan(scores["exact_match/strict-match_stderr"])
    assert harness_name("acc_stderr,none") == "acc_stderr" and harness_name("alias") is None
    assert is_stderr("exact_match/strict-match_stderr") and is_stderr("exact_match_stderr/strict-match")
    assert not is_stderr("exact_match/strict-match")


def test_nan_stderr_of_a_filtered_metric_does_not_block_promotion() -> None:
    scores = parse_results(OUT, ["gsm"])
    v = judge(scores, None, {"gsm": GateRule(metric="exact_match/flexible-extract", min=0.4)}, {},
              directions={"gsm": {"exact_match": True, "acc": True}})
    assert v.passed, [c.describe() for c in v.failures]


def test_gate_message_lists_metrics_not_stderr() -> None:
    scores = parse_results(OUT, ["gsm"])
    with pytest.raises(InputDataError) as e:
        judge(scores, None, {"gsm": GateRule(metric="exact_match", min=0.4)}, {})
    assert str(e.value).endswith("not among its scores ['acc', 'exact_match/flexible-extract', "
                                 "'exact_match/strict-match']")


def test_report_shows_the_stderr_of_a_filtered_metric() -> None:
    scores = parse_results(OUT, ["gsm"])
    results = {"columns": [["gsm", "exact_match/flexible-extract"]],
               "models": [{"label": "m", "uri": "/m", "digest": "dir-abc", "scores": scores, "loss_curve": []}],
               "tasks": {}, "harness": {"lm_eval": "x", "transformers": "y", "torch": "z"}, "baseline": None,
               "gate": None}
    assert "| m | 0.5000 ± 0.100 |" in render_markdown(results)
    assert "<td>0.5000 ± 0.100</td>" in render_html(results)


def test_numpy_scalar_scores_are_kept() -> None:
    """A metric aggregated to a numpy float32/int64 was dropped (`isinstance(v, int | float)` is False)."""
    import numpy as np

    out = {"results": {"t": {"acc,none": np.float32(0.5), "count,none": np.int64(3), "flag,none": True}}}
    assert parse_results(out, ["t"]) == {"t": {"acc": 0.5, "count": 3.0}}
