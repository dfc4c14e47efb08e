"""Evaluate stage config: which lm-eval tasks, how they run, held-out perplexity, and the gate.

    evaluate:
      tasks: [kubellm_knowledge, kubellm_format, kubellm_preference]
      limit: 50
      gate:
        registry: s3://bucket/kubellm/registry
        rules:
          kubellm_knowledge: {max_drop: 0.02}        # at most 2 points below the promoted model
          kubellm_format: {metric: correct, min: 0.5}
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from kubellm.core.config import StrictModel

BUNDLED_TASKS = ("kubellm_knowledge", "kubellm_format", "kubellm_preference")
# The bundled tasks run with the chat template unless `chat_tasks` says otherwise.
DEFAULT_CHAT_TASKS = ("kubellm_format", "kubellm_preference")
# Devices lm-eval's `hf` model takes as given on one process; it ignores any other name (logging
# "Device not specified") and picks cuda-or-cpu itself.
DEVICE_PATTERN = re.compile(r"^(cpu|cuda|cuda:\d+|mps)$")

# The number the report, the KFP Metrics artifact and the gate use for a task when none is named.
DEFAULT_HEADLINE = {"kubellm_knowledge": "acc", "kubellm_format": "format_ok", "kubellm_preference": "acc",
                    "perplexity": "perplexity"}

# What each bundled task (its YAML metric_list) and held-out perplexity report: a rule or headline
# naming anything else is a typo caught before any model is evaluated.
BUNDLED_METRICS = {"kubellm_knowledge": ("acc", "acc_norm"), "kubellm_format": ("exact_match", "format_ok", "correct"),
                   "kubellm_preference": ("acc", "acc_norm", "margin"), "perplexity": ("perplexity", "nll", "tokens")}


class GateRule(StrictModel):
    """What a candidate must achieve on one task to be promoted. Values are in the metric's own units
    (accuracy in 0..1: `max_drop: 0.02` is two points)."""

    metric: str | None = None
    """Metric to judge (default: the task's headline metric: acc, format_ok, acc, perplexity)."""
    max_drop: float | None = Field(default=None, ge=0)
    """Largest allowed worsening against the promoted baseline: a drop for a metric lm-eval reports
    as higher_is_better, a rise for one it reports lower-is-better (and for held-out perplexity/nll);
    refused for a metric whose direction lm-eval does not report. The baseline's score must come
    from this run's settings for the task: where the pointer's came from other settings (task
    version or config, data, limit, n-shot, …) the promoted model is re-scored in this run. Needs a
    baseline; ignored for the first promotion."""
    min: float | None = None
    """Absolute floor the candidate must reach (higher-is-better metrics)."""
    max: float | None = None
    """Absolute ceiling the candidate must stay under (lower-is-better metrics such as perplexity)."""

    @model_validator(mode="after")
    def _some_bound(self) -> GateRule:
        if self.max_drop is None and self.min is None and self.max is None:
            raise ValueError("a gate rule needs at least one of max_drop, min, max")
        return self


class GateConfig(StrictModel):
    """The promotion gate and the minimal model registry it moves."""

    enabled: bool = True
    """Apply the rules; when off the stage only reports."""
    registry: str | None = None
    """Registry root (local dir or s3://…); the promoted pointer is `<registry>/<name>/promoted.json`.
    Default: `<output>/registry`. A `baseline` input overrides where the pointer is read and moved."""
    name: str = Field(default="kubellm", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Registry entry (one promoted model per name)."""
    candidate: str | None = None
    """Label of the model the gate judges and may promote (default: the last model listed)."""
    promote: bool = True
    """Move the pointer to the candidate when it passes (off: judge only)."""
    rules: dict[str, GateRule] = Field(default_factory=dict)
    """Task name (or `perplexity`) -> rule. Every rule must pass to promote. A perplexity rule needs a
    tokens input; a run that never promotes (promote false: the scheduled report) skips it when it has
    none, and its report says so."""


class EvaluateConfig(StrictModel):
    tasks: list[str] = Field(default_factory=lambda: list(BUNDLED_TASKS), min_length=1)
    """lm-eval task names: the bundled kubellm_* tasks and any standard harness task (its data must be
    reachable: a Hub dataset needs network or a populated HF cache)."""
    chat_tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_CHAT_TASKS))
    """Tasks run with the tokenizer's chat template (their own harness call: `apply_chat_template`
    applies to a whole call). The format task measures the chat format; preference prompts are
    chat-formatted in DPO training. Each entry must be one of `tasks` (a typo would run the task
    without the template); left unset, the defaults that are in `tasks`."""
    eval_dir: str | None = None
    """Directory (local or s3://…) with knowledge.jsonl, format.jsonl, preference.jsonl for the bundled
    tasks, e.g. a demo-world `eval/` dir. Default: the small files shipped in kubellm/evaluate/tasks/data."""
    batch_size: int = Field(default=8, ge=1)
    """lm-eval batch size (also the perplexity batch size)."""
    limit: int | None = Field(default=None, ge=1)
    """Evaluate at most this many items per task (None = all)."""
    num_fewshot: int | None = Field(default=None, ge=0)
    """Few-shot examples per item (None = each task's default, 0 for the bundled tasks). The bundled
    tasks have no few-shot split (their only split is the test items, several of which state the same
    fact), so num_fewshot > 0 is refused while any of them is in `tasks`."""
    seed: int = 1234
    """Seed for lm-eval's python/numpy/torch RNGs and few-shot selection."""
    bootstrap_iters: int = Field(default=1000, ge=0)
    """Bootstrap resamples for standard errors (0 = none; keep small in tests)."""
    device: str | None = None
    """Torch device for the models: cpu, cuda, cuda:N or mps (default: cuda when available, else cpu)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype for evaluation (auto = as exported; float32 | bfloat16 | float16: the torch dtype
    names lm-eval's `hf` model takes)."""
    headline: dict[str, str] = Field(default_factory=dict)
    """Task -> metric shown in the table/plots and sent to KFP Metrics (defaults in DEFAULT_HEADLINE)."""
    perplexity_seq_len: int = Field(default=256, ge=2)
    """Window length for held-out perplexity (documents longer than this are split)."""
    perplexity_max_tokens: int | None = Field(default=200_000, ge=1)
    """Score at most this many validation tokens (None = all)."""
    gate: GateConfig = Field(default_factory=GateConfig)
    """Promotion gate and registry."""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v is not None and not DEVICE_PATTERN.match(v):
            raise ValueError(f"{v!r} is not a device lm-eval takes: expected cpu, cuda, cuda:N or mps "
                             "(or leave it unset: cuda when available, else cpu)")
        return v

    @model_validator(mode="after")
    def _chat_tasks_listed(self) -> EvaluateConfig:
        dup = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if dup:  # it would be one harness result shown (and sent to KFP) as two columns
            raise ValueError(f"tasks lists {dup} more than once")
        if "chat_tasks" in self.model_fields_set:
            stray = [t for t in self.chat_tasks if t not in self.tasks]
            if stray:  # a typo would run the intended task without the chat template
                raise ValueError(f"chat_tasks names {stray}, which {'is' if len(stray) == 1 else 'are'} not in "
                                 f"tasks {self.tasks}; every chat task must be one of the evaluated tasks")
        else:  # the default: the bundled chat tasks that are evaluated
            self.chat_tasks = [t for t in self.chat_tasks if t in self.tasks]
        bundled = [t for t in self.tasks if t in BUNDLED_TASKS]
        if self.num_fewshot and bundled:
            raise ValueError(
                f"num_fewshot {self.num_fewshot}: the bundled task(s) {bundled} have no few-shot split (their "
                "few-shot examples would be drawn from the test items themselves, which state the same facts "
                "in other words and would hand the model the answer); use num_fewshot 0 or unset, and run "
                "few-shot standard tasks in an evaluation without the bundled ones")
        # A rule on a task that is not evaluated is a typo.
        known = set(self.tasks) | {"perplexity"}
        bad = sorted(set(self.gate.rules) - known)
        if bad:
            raise ValueError(f"gate.rules names task(s) {bad} that are not evaluated; evaluated: {sorted(known)}")
        # a preset's headline for a bundled task this run does not evaluate is dropped (as chat_tasks'
        # default is); any other task not evaluated is a typo
        kept = {t: m for t, m in self.headline.items() if t in known or t not in BUNDLED_TASKS}
        if kept != self.headline:  # assigning re-validates (validate_assignment): only when it changes
            self.headline = kept
        bad = sorted(set(self.headline) - known)
        if bad:
            raise ValueError(f"headline names task(s) {bad} that are not evaluated; evaluated: {sorted(known)}")
        named = [(f"gate.rules.{t}.metric", t, r.metric) for t, r in self.gate.rules.items()]
        named += [(f"headline.{t}", t, m) for t, m in self.headline.items()]
        for where, task, metric in named:
            have = BUNDLED_METRICS.get(task)
            if metric is not None and have is not None and metric not in have:
                raise ValueError(f"{where}: {task} reports no metric {metric!r}; it reports {list(have)}")
        return self

    def headline_metric(self, task: str) -> str | None:
        return self.headline.get(task) or DEFAULT_HEADLINE.get(task)
