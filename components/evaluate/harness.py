"""Run the lm-eval harness on one HF export: `simple_evaluate` with the `hf` model type.

    scores = evaluate_export("/tmp/model", cfg, data_dir="/tmp/eval")   # -> HarnessResult

Tasks that need the chat template run in their own `simple_evaluate` call with
`apply_chat_template=True` (the harness applies it to a whole call, not per task); the model is
loaded once (`hf` via lm-eval's registry, exactly what `simple_evaluate(model="hf", ...)` does) and
shared by both calls. The bundled tasks come from `TaskManager(include_path=<kubellm tasks dir>)`;
the harness's own task index is only built when a standard task is requested (it takes seconds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
from pathlib import Path
from typing import Any

from kubellm.core.errors import ConfigError, InputDataError, KubellmError
from kubellm.evaluate.config import BUNDLED_TASKS, EvaluateConfig
from kubellm.evaluate.metrics import harness_name
from kubellm.evaluate.taskdata import METADATA_KEY, TASKS_DIR

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclasses.dataclass
class HarnessResult:
    """Scores of one model: task -> {metric: value} (stderr as `<metric>_stderr`, a filtered metric as
    `<metric>/<filter>`), plus per-task facts."""

    scores: dict[str, dict[str, float]]
    versions: dict[str, Any]
    n_shot: dict[str, int]
    n_samples: dict[str, int]
    chat: dict[str, bool]
    higher_is_better: dict[str, dict[str, bool | None]]
    """lm-eval's direction per task and metric (keyed by the metric name without its filter)."""
    configs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """lm-eval's dumped config of each task as it ran (num_fewshot, splits, prompts, hook sources)."""


def harness_version() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("lm_eval", "transformers", "torch", "datasets")}


def check_hf_export(path: Path) -> None:
    """Refuse a directory that is not an HF causal-LM export, naming what is missing."""
    if not path.is_dir():
        raise InputDataError(f"{path}: not a directory (expected an HF model export)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise InputDataError(f"{path}: not a valid HF export: no config.json")
    try:
        conf = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise InputDataError(f"{cfg}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(conf, dict) or "model_type" not in conf:
        raise InputDataError(f"{cfg}: not an HF model config (no 'model_type')")
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in path.iterdir()):
        raise InputDataError(f"{path}: not a valid HF export: no *.safetensors weights "
                             "(kubellm exports safetensors only; pickled .bin weights are refused)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise InputDataError(f"{path}: not a valid HF export: no tokenizer ({' or '.join(TOKENIZER_FILES)})")


def task_manager(tasks: list[str], data_dir: Path | None) -> Any:
    """A TaskManager that knows the bundled tasks (and the harness's, when a standard one is asked for)."""
    from lm_eval.tasks import TaskManager

    ours = [t for t in tasks if t.startswith("kubellm_") and t not in BUNDLED_TASKS]
    if ours:  # our namespace: no need to index the harness's ~200 task dirs to know it is a typo
        raise ConfigError(f"evaluate.tasks: task(s) {ours} do not exist. Bundled: {', '.join(BUNDLED_TASKS)}")
    standard = [t for t in tasks if t not in BUNDLED_TASKS]
    meta = {METADATA_KEY: str(data_dir)} if data_dir is not None else None
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(standard), metadata=meta)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise ConfigError(
            f"evaluate.tasks: task(s) {unknown} do not exist. Bundled: {', '.join(BUNDLED_TASKS)}; "
            "standard harness tasks are listed by `lm_eval ls tasks`"
        )
    tags = [t for t in tasks if t in set(tm.all_tags)]
    if tags:  # lm-eval would run every task under it in one call and report none under the tag's name
        raise ConfigError(
            f"evaluate.tasks: {tags} {'is an lm-eval tag' if len(tags) == 1 else 'are lm-eval tags'}, naming "
            "several tasks; list the tasks themselves (each gets its own column, few-shot count and chat "
            f"setting). Bundled: {', '.join(BUNDLED_TASKS)}; a tag's tasks are listed by `lm_eval ls tags`"
        )
    return tm


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, naming evaluate.device (lm-eval would fail inside the
    model load, or fall back to another device without saying so)."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"evaluate.device {device!r}: no CUDA device is visible here "
                              "(torch.cuda.is_available() is False); use cpu, or leave it unset")
        if index and int(index) >= n:
            raise ConfigError(f"evaluate.device {device!r}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"evaluate.device {device!r}: MPS is not available here; use cpu, or leave it unset")


def load_model(model_dir: Path, cfg: EvaluateConfig) -> Any:
    """lm-eval's `hf` model on `model_dir` (what `simple_evaluate(model="hf", ...)` builds)."""
    import lm_eval.api.registry
    import torch

    check_hf_export(model_dir)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    args = {"pretrained": str(model_dir), "dtype": cfg.dtype, "trust_remote_code": False}
    try:
        return lm_eval.api.registry.get_model("hf").create_from_arg_obj(
            args, {"batch_size": cfg.batch_size, "device": device}
        )
    except Exception as e:
        raise InputDataError(f"{model_dir}: lm-eval could not load it as an HF causal LM: {e}") from e


def _run(lm: Any, tm: Any, tasks: list[str], cfg: EvaluateConfig, chat: bool) -> dict[str, Any]:
    import lm_eval

    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=tm, num_fewshot=cfg.num_fewshot,
            batch_size=cfg.batch_size, limit=cfg.limit, bootstrap_iters=cfg.bootstrap_iters,
            apply_chat_template=chat, log_samples=False, random_seed=cfg.seed,
            numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
        )
    except KubellmError:
        raise
    except Exception as e:  # the harness raises bare exceptions (dataset download, bad template, ...)
        cause = e.__cause__ if isinstance(e.__cause__, KubellmError) else None
        if cause is not None:
            raise cause from e
        raise KubellmError(f"lm-eval failed on task(s) {tasks} (chat template {'on' if chat else 'off'}): "
                           f"{type(e).__name__}: {e}") from e
    if out is None:
        raise KubellmError(f"lm-eval returned no results for {tasks} (not rank 0?)")
    return out


def parse_results(out: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    """`{"acc,none": 0.5, "acc_stderr,none": 0.1}` -> `{"acc": 0.5, "acc_stderr": 0.1}` per task; a
    filtered metric keeps its filter: `exact_match,strict-match` -> `exact_match/strict-match`, its
    `exact_match_stderr,strict-match` -> `exact_match/strict-match_stderr` (kubellm.evaluate.metrics)."""
    scores: dict[str, dict[str, float]] = {}
    for task in tasks:
        res = out["results"].get(task)
        if res is None:
            raise KubellmError(f"lm-eval returned no result for task {task}")
        metrics: dict[str, float] = {}
        for key, value in res.items():
            name = harness_name(key)
            if name is None or not isinstance(value, numbers.Real) or isinstance(value, bool):  # numpy scalars too
                continue  # "N/A" stderr (one item), alias, sample_len
            metrics[name] = float(value)
        scores[task] = metrics
    return scores


def evaluate_lm(lm: Any, cfg: EvaluateConfig, tm: Any, tasks: list[str] | None = None) -> HarnessResult:
    """Every task of `cfg.tasks` (or the subset `tasks`) on one loaded model; `tm` from `task_manager`
    (built once per run)."""
    chat_set = set(cfg.chat_tasks)
    wanted = [t for t in cfg.tasks if tasks is None or t in tasks]
    groups = [(False, [t for t in wanted if t not in chat_set]), (True, [t for t in wanted if t in chat_set])]
    res = HarnessResult({}, {}, {}, {}, {}, {})
    for chat, tasks in groups:
        if not tasks:
            continue
        out = _run(lm, tm, tasks, cfg, chat)
        res.scores.update(parse_results(out, tasks))
        for t in tasks:
            res.versions[t] = out.get("versions", {}).get(t)
            res.n_shot[t] = int(out.get("n-shot", {}).get(t, 0))
            res.n_samples[t] = int(out.get("n-samples", {}).get(t, {}).get("effective", 0))
            res.chat[t] = chat
            res.higher_is_better[t] = dict(out.get("higher_is_better", {}).get(t, {}))
            res.configs[t] = dict(out.get("configs", {}).get(t, {}))
    return res
