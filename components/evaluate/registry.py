"""A minimal model registry: one promoted pointer per name, moved only by a passing gate.

    reg = Registry("s3://bucket/kubellm/registry", "kubellm")    # pointer: <root>/kubellm/promoted.json
    current = reg.current()                                       # Promoted | None (+ its ETag)
    verdict = judge(candidate_scores, current, rules)             # GateVerdict; .failures name task + numbers
    reg.promote(entry, expected=current)                          # conditional write: compare-and-swap
    apply_gate(eval_manifest)             # what the stage / the pipelines' gate step do with a verdict

The pointer is a small JSON object (model manifest URI + digest + the scores it was promoted with).
It is moved with a conditional write — S3 `IfNoneMatch="*"` for the first promotion and `IfMatch`
on the ETag read for every later one (an exclusive lock + compare locally) — so two gates racing
from the same baseline cannot both move it: the loser gets PromotionConflictError and the pointer
names the winner. Every promotion is also recorded under `<root>/<name>/history/`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kubellm.core.errors import InputDataError, KubellmError, StorageError
from kubellm.core.storage import join, storage_for
from kubellm.evaluate.config import GateRule
from kubellm.evaluate.metrics import base_metric, higher_is_better, is_stderr

log = logging.getLogger(__name__)

POINTER_NAME = "promoted.json"


class GateFailedError(KubellmError):
    """The candidate did not pass the promotion gate; the pointer was not moved."""


class PromotionConflictError(KubellmError):
    """Another gate moved the pointer between our read and our write; ours was not applied."""


class Promoted(BaseModel):
    """The pointer's content."""

    model_config = ConfigDict(extra="forbid")
    name: str
    model_uri: str = Field(description="the promoted model's manifest prefix (or local HF dir)")
    model_digest: str
    label: str = ""
    scores: dict[str, dict[str, float]] = Field(default_factory=dict, description="task -> metric -> value")
    eval_uri: str = Field(default="", description="the eval artifact that justified the promotion")
    eval_settings_hash: str = Field(default="", description="hash of the settings the scores came from")
    eval_settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="task -> the settings its score came from (task version, task "
        "config hash, eval data sha256, limit, n-shot, chat, seed, dtype, lm-eval version; for perplexity "
        "the tokens digest and window): a later gate compares only like with like")
    task_versions: dict[str, Any] = Field(default_factory=dict, description="task -> lm-eval task version")
    lm_eval_version: str = ""
    previous_digest: str | None = None
    promoted_at: str = Field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat())


@dataclasses.dataclass
class Current:
    """The pointer as read: its content, URI and the ETag a conditional update must match."""

    entry: Promoted
    uri: str
    etag: str


class Registry:
    def __init__(self, root: str, name: str) -> None:
        self.root, self.name = root, name

    @property
    def pointer_uri(self) -> str:
        return join(self.root, self.name, POINTER_NAME)

    @classmethod
    def from_pointer(cls, pointer_uri: str) -> Registry:
        """The registry whose pointer is `pointer_uri` (`<root>/<name>/promoted.json`) or whose entry
        directory is `pointer_uri` (`<root>/<name>`)."""
        uri = pointer_uri.rstrip("/")
        if uri.endswith("/" + POINTER_NAME):
            uri = uri[: -len(POINTER_NAME) - 1]
        root, _, name = uri.rpartition("/")
        if not root or not name:
            raise InputDataError(f"baseline {pointer_uri!r}: expected <registry>/<name>/{POINTER_NAME}")
        return cls(root, name)

    def current(self) -> Current | None:
        st = storage_for(self.pointer_uri)
        if not st.exists(self.pointer_uri):
            return None
        data, etag = st.read_with_etag(self.pointer_uri)
        try:
            entry = Promoted.model_validate_json(data)
        except Exception as e:
            raise InputDataError(f"{self.pointer_uri}: not a kubellm promoted-model pointer: {e}") from e
        return Current(entry, self.pointer_uri, etag)

    def promote(self, entry: Promoted, expected: Current | None) -> str:
        """Point the registry at `entry` if it still points where `expected` says (None: nowhere).
        Returns the pointer URI; raises PromotionConflictError if another writer moved it first."""
        st = storage_for(self.pointer_uri)
        body = entry.model_dump_json(indent=2).encode()
        if expected is None:
            ok = st.put_if_absent(self.pointer_uri, body)
        else:
            ok = st.put_if_match(self.pointer_uri, body, expected.etag)
        if not ok:
            now = self.current()
            who = f"{now.entry.label or '?'} ({now.entry.model_digest[:12]})" if now else "nothing (deleted)"
            raise PromotionConflictError(
                f"{self.pointer_uri}: another gate moved the promoted pointer while this one ran (it now "
                f"points at {who}); {entry.label or entry.model_uri} was NOT promoted — re-run the "
                "evaluation against the new baseline"
            )
        stamp = entry.promoted_at.replace(":", "").replace("+", "Z")
        hist = join(self.root, self.name, "history", f"{stamp}-{entry.model_digest[:12]}.json")
        try:
            st.put_if_absent(hist, body)
        except StorageError:
            pass  # history is a courtesy; the pointer is the record
        return self.pointer_uri


@dataclasses.dataclass
class Check:
    task: str
    metric: str
    kind: str  # "max_drop" | "min" | "max" | "finite" | "settings" | "direction"
    value: float
    bound: float
    baseline: float | None
    passed: bool
    higher_is_better: bool | None = None
    """The metric's direction (max_drop checks; from lm-eval, or kubellm's own for perplexity)."""
    detail: str = ""
    """settings checks: what differs between this run's and the baseline's settings; direction checks:
    why the rule cannot be judged."""

    def describe(self) -> str:
        if self.kind == "max_drop":
            b = self.baseline if self.baseline is not None else math.nan
            change = self.value - b
            worsening = -change if self.higher_is_better else change
            moved = ("dropped" if change < 0 else "rose") + (" (worse)" if worsening > 0 else " (better)")
            if change == 0 or not math.isfinite(change):
                moved = "unchanged" if change == 0 else "not comparable"
            return (f"{self.task} {self.metric} {self.value:.4f} vs baseline {b:.4f}: {moved}"
                    + (f" by {abs(change):.4f}" if change else "")
                    + f" (allowed worsening {self.bound:.4f}; {'higher' if self.higher_is_better else 'lower'} is better)")
        if self.kind == "finite":
            return f"{self.task} {self.metric} is {self.value}: a model with a non-finite score is never promoted"
        if self.kind == "direction":
            return self.detail
        if self.kind == "settings":
            return (f"{self.task} {self.metric}: the baseline's score comes from other evaluation settings "
                    f"({self.detail}); max_drop cannot compare them — re-score the promoted model under this "
                    "run's settings (evaluate it in this run) or drop the max_drop rule")
        rel = "≥" if self.kind == "min" else "≤"
        return f"{self.task} {self.metric} {self.value:.4f} must be {rel} {self.bound:.4f}"


@dataclasses.dataclass
class GateVerdict:
    checks: list[Check]
    baseline_digest: str | None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "baseline_digest": self.baseline_digest,
                "checks": [dataclasses.asdict(c) | {"message": c.describe()} for c in self.checks]}


def judge(scores: dict[str, dict[str, float]], baseline: Promoted | None, rules: dict[str, GateRule],
          headline: dict[str, str | None], baseline_uri: str = "", *,
          directions: Mapping[str, Mapping[str, bool | None]] | None = None,
          baseline_scores: Mapping[str, Mapping[str, float]] | None = None,
          unlike: Mapping[str, str] | None = None) -> GateVerdict:
    """Apply every rule to the candidate's `scores` (task -> metric -> value).

    directions       task -> metric (without filter) -> lm-eval's `higher_is_better` (results.json
                     `tasks.<task>.higher_is_better`); held-out perplexity's is kubellm's own. A
                     max_drop rule on a metric whose direction is unknown is a failed "direction"
                     check (the gate fails naming it; the report still publishes).
    baseline_scores  what max_drop compares against (default: the pointer's scores); the stage passes
                     the promoted model's scores re-measured in this run where the pointer's came from
                     other settings.
    unlike           task -> what differs, for tasks whose `baseline_scores` still come from other
                     settings: a max_drop rule on one fails (unlike numbers are not compared)."""
    directions = directions or {}
    unlike = unlike or {}
    base_scores = baseline_scores if baseline_scores is not None else (baseline.scores if baseline else {})
    checks: list[Check] = []
    for task, rule in rules.items():
        metric = rule.metric or headline.get(task)
        if task not in scores:
            raise InputDataError(f"gate rule for task {task}: the candidate has no score for it")
        if metric is None or metric not in scores[task]:
            raise InputDataError(f"gate rule for task {task}: metric {metric!r} not among its scores "
                                 f"{sorted(k for k in scores[task] if not is_stderr(k))}")
        value = scores[task][metric]
        higher = higher_is_better(task, metric, directions) if rule.max_drop is not None else None
        if rule.max_drop is not None and higher is None:
            # a failed check, not an exception: the evaluation is done, its report still publishes
            checks.append(Check(task, metric, "direction", value, rule.max_drop, None, False, None, (
                f"evaluate.gate.rules.{task}: max_drop on metric {metric!r}, but lm-eval reports no direction "
                f"for it (higher_is_better of {task}/{base_metric(metric)} is "
                f"{directions.get(task, {}).get(base_metric(metric))!r}): a drop cannot be told from a rise; "
                "use an absolute min or max bound for this metric instead")))
        elif rule.max_drop is not None and baseline is not None:
            base = base_scores.get(task, {})
            if metric not in base:
                have = sorted(base_scores) if task not in base_scores else sorted(base)
                what = f"task {task}" if task not in base_scores else f"metric {task}/{metric}"
                raise InputDataError(
                    f"baseline {baseline_uri or baseline.model_uri} lacks {what} (it has {have}); the gate "
                    f"rule on {task} cannot compare — promote a model evaluated on {task} or drop max_drop"
                )
            b = base[metric]
            if task in unlike:
                checks.append(Check(task, metric, "settings", value, rule.max_drop, b, False, higher, unlike[task]))
            else:
                worsening = (b - value) if higher else (value - b)
                checks.append(Check(task, metric, "max_drop", value, rule.max_drop, b,
                                    worsening <= rule.max_drop + 1e-12, higher))
        if rule.min is not None:
            checks.append(Check(task, metric, "min", value, rule.min, None, value >= rule.min))
        if rule.max is not None:
            checks.append(Check(task, metric, "max", value, rule.max, None, value <= rule.max))
    # A nan/inf score (diverged weights, overflowing logits) is no score: never promote it, ruled or not.
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            if not is_stderr(metric) and not math.isfinite(value):
                checks.append(Check(task, metric, "finite", value, 0.0, None, False))
    return GateVerdict(checks, baseline.model_digest if baseline else None)


def raise_if_failed(verdict: GateVerdict, label: str, pointer_uri: str, report_uri: str) -> None:
    if verdict.passed:
        return
    _fail(label, [c.describe() for c in verdict.failures], pointer_uri, report_uri)


def _fail(label: str, messages: list[str], pointer_uri: str, report_uri: str) -> None:
    raise GateFailedError(
        f"promotion gate FAILED for {label}: {'; '.join(messages)}. The promoted pointer {pointer_uri} was not "
        f"moved; report: {report_uri}"
    )


def apply_gate(manifest: Any, *, promote: bool = True) -> Promoted | None:
    """Apply the verdict an evaluate artifact (`kind: eval`) records: raise GateFailedError naming the
    failed checks, or — when the gate passed and the evaluation asked to promote (and `promote`) —
    move the pointer to the candidate. Returns the entry written, None when nothing moved.

    The pointer moves only if it still names the model the evaluation compared against (else
    PromotionConflictError: re-evaluate against the new one); the write itself is conditional on the
    ETag just read. If it already names this evaluation's candidate from this very artifact (a
    retried gate step), that is success. The evaluate stage calls this right after publishing; the
    pipelines run it as their own gate step, so the report reaches the UI when the gate fails."""
    from kubellm.core.manifest import read_verified

    results = json.loads(read_verified(manifest, "results.json"))  # the verdict as committed, nothing else
    gate = results.get("gate")
    if not gate:
        return None
    report_uri = manifest.file_uri("report.html")
    if not gate["passed"]:
        _fail(gate["candidate"], [c["message"] for c in gate["checks"] if not c["passed"]], gate["pointer"], report_uri)
    if not (gate.get("promoted") and promote):
        return None
    reg = Registry.from_pointer(gate["pointer"])
    current = reg.current()
    cand = next(m for m in results["models"] if m["label"] == gate["candidate"])
    seen = current.entry.model_digest if current else None
    if current is not None and seen == cand["digest"] and current.entry.eval_uri == manifest.uri:
        return current.entry  # this evaluation's promotion already happened (a retried step)
    if seen != gate.get("baseline_digest"):
        raise PromotionConflictError(
            f"{reg.pointer_uri}: the promoted pointer moved after this evaluation read it (it was judged "
            f"against {_short(gate.get('baseline_digest'))}, the pointer now names {_short(seen)}); "
            f"{gate['candidate']} was NOT promoted — re-run the evaluation against the new baseline")
    tasks = results.get("tasks", {})
    entry = Promoted(
        name=reg.name, model_uri=cand["uri"], model_digest=cand["digest"], label=gate["candidate"],
        scores={t: {k: float(v) for k, v in s.items() if isinstance(v, int | float) and math.isfinite(v)}
                for t, s in cand["scores"].items()},
        eval_uri=manifest.uri, eval_settings_hash=results.get("settings_hash", ""),
        eval_settings=results.get("task_settings", {}),
        task_versions={t: info.get("version") for t, info in tasks.items()},
        lm_eval_version=results.get("harness", {}).get("lm_eval", ""),
        previous_digest=seen)
    reg.promote(entry, current)
    log.info("promoted %s -> %s", gate["candidate"], reg.pointer_uri)
    return entry


def _short(digest: str | None) -> str:
    return f"model {digest[:12]}" if digest else "no model"


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
