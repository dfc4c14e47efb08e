"""Hooks the kubellm task YAMLs name with `!function utils.<name>` (lm-eval loads this file by path).

The logic lives in the kubellm package (`kubellm.evaluate.taskdata`); this file only binds it, so
`lm_eval --include_path <this dir>` and the evaluate stage read the same items the same way.
"""

from __future__ import annotations

from typing import Any

from kubellm.evaluate.taskdata import load_dataset


def load_knowledge(**metadata: Any) -> Any:
    return load_dataset("kubellm_knowledge", **metadata)


def load_format(**metadata: Any) -> Any:
    return load_dataset("kubellm_format", **metadata)


def load_preference(**metadata: Any) -> Any:
    return load_dataset("kubellm_preference", **metadata)


def format_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """exact_match: the reply, stripped, is exactly the answer (the chat format ends the reply with
    the end-of-turn marker, a stop sequence, so a model that keeps talking does not match);
    answer_first: the reply starts with the answer (right content, loose format)."""
    reply = (results[0] if results else "").strip()
    answer = doc["answer"].strip()
    return {"exact_match": float(reply == answer), "answer_first": float(reply.startswith(answer))}
