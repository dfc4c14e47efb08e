"""Metric names as the evaluate stage stores them, and which way each one is better.

lm-eval reports `<metric>,<filter>` and `<metric>_stderr,<filter>`; kubellm stores a task's scores as
    acc, acc_stderr                                   (filter "none")
    exact_match/strict-match, exact_match/strict-match_stderr     (any other filter)
so a metric's standard error is always `stderr_name(metric)`, whatever its filter.

Direction: lm-eval reports `higher_is_better` per task and metric (keyed by the metric name without
its filter); the evaluate stage records it in results.json (`tasks.<task>.higher_is_better`) and the
gate reads it from there. Only kubellm's own held-out perplexity task has a fixed direction here.
"""

from __future__ import annotations

from collections.abc import Mapping

STDERR = "_stderr"
PERPLEXITY_TASK = "perplexity"
# kubellm's own held-out perplexity (kubellm.evaluate.perplexity): `tokens` is a count, not a score.
PERPLEXITY_DIRECTIONS: dict[str, bool | None] = {"perplexity": False, "nll": False, "tokens": None}


def stderr_name(metric: str) -> str:
    """`acc` -> `acc_stderr`; `exact_match/strict-match` -> `exact_match/strict-match_stderr`."""
    return metric + STDERR


def harness_name(key: str) -> str | None:
    """lm-eval's result key (`exact_match_stderr,strict-match`) as stored (`exact_match/strict-match_stderr`);
    None for keys that are not `<name>,<filter>` (alias, sample_len, ...)."""
    if "," not in key:
        return None
    name, filt = key.split(",", 1)
    err = name.endswith(STDERR)
    base = name[: -len(STDERR)] if err else name
    stored = base if filt == "none" else f"{base}/{filt}"
    return stored + (STDERR if err else "")


def is_stderr(name: str) -> bool:
    """A standard error, not a score (also the older `exact_match_stderr/strict-match` spelling)."""
    return name.endswith(STDERR) or name.split("/", 1)[0].endswith(STDERR)


def base_metric(name: str) -> str:
    """The metric without its filter: `exact_match/strict-match` -> `exact_match` (how lm-eval keys
    `higher_is_better`)."""
    return name.split("/", 1)[0]


def higher_is_better(task: str, metric: str, directions: Mapping[str, Mapping[str, bool | None]]) -> bool | None:
    """True/False when known, None when neither lm-eval nor kubellm says which way `metric` is better.
    `directions`: task -> metric (no filter) -> lm-eval's `higher_is_better`."""
    base = base_metric(metric)
    if task == PERPLEXITY_TASK:
        return PERPLEXITY_DIRECTIONS.get(base)
    value = directions.get(task, {}).get(base)
    return value if isinstance(value, bool) else None
