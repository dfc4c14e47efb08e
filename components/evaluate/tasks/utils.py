"""Hooks the kubellm task YAMLs name with `!function utils.<name>` (lm-eval loads this file by path).

The logic lives in the kubellm package (`kubellm.evaluate.taskdata`); this file only binds it, so
`lm_eval --include_path <this dir>` and the evaluate stage read the same items the same way.
"""

from __future__ import annotations

import re
from typing import Any

from kubellm.evaluate.taskdata import captured, load_dataset


def load_knowledge(**metadata: Any) -> Any:
    return load_dataset("kubellm_knowledge", **metadata)


def load_format(**metadata: Any) -> Any:
    return load_dataset("kubellm_format", **metadata)


def load_preference(**metadata: Any) -> Any:
    return load_dataset("kubellm_preference", **metadata)


def format_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """format_ok: the reply follows the chat format (`format_regex`, e.g. `Answer:\\s*(\\w+)`);
    correct: it does and the captured value is `value` (an item without one: what the regex captures
    from `answer`); exact_match: the stripped reply is `answer`. Items without a regex fall back to:
    format_ok = the reply starts with the answer."""
    reply = (results[0] if results else "").strip()
    answer = doc["answer"].strip()
    regex, value = doc.get("format_regex"), doc.get("value")
    if regex:
        m = re.search(regex, reply)
        ok = m is not None
        value = (value or "").strip() or captured(re.search(regex, answer)) or answer  # none stored as ""
        correct = ok and captured(m) == value
    else:
        ok = correct = reply.startswith(answer)
    return {"exact_match": float(reply == answer), "format_ok": float(ok), "correct": float(correct)}


def preference_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """results = [(loglik(chosen), greedy), (loglik(rejected), greedy)] from the harness.

    acc: the chosen reply has the higher total log-likelihood (what DPO's implicit reward compares);
    acc_norm: the same per byte (no advantage for the shorter reply); margin: log-likelihood of
    chosen minus rejected, in nats (continuous, so it moves before acc flips)."""
    ll_c, ll_r = float(results[0][0]), float(results[1][0])
    n_c, n_r = len(doc["chosen"].encode()), len(doc["rejected"].encode())
    return {"acc": float(ll_c > ll_r), "acc_norm": float(ll_c / n_c > ll_r / n_r), "margin": ll_c - ll_r}
