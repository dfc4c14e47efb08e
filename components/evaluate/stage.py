"""The evaluate stage: lm-eval on one or more HF exports, held-out perplexity, report, gate.

    kubellm evaluate --preset debug --output /tmp/art \
        --input models=base:/tmp/art/pretrain/ab12,sft:/tmp/art/sft/cd34,dpo:/tmp/art/dpo/ef56 \
        --input tokens=/tmp/art/tokenizer/0123 [--input baseline=/tmp/art/registry/kubellm/promoted.json]

Inputs
  models    comma-separated `[label:]ref`; ref = a model artifact (manifest JSON file or prefix, kind
            `model`, files = an HF LlamaForCausalLM export with its tokenizer) or a plain local HF
            export dir. Labels default to the producing stage (`…/sft/<hash>` -> `sft`) or the dir name.
  tokens    optional token-shard artifact (kind `token_shards`): held-out perplexity on validation/*.tok
  baseline  optional promoted pointer (`<registry>/<name>/promoted.json`) that must exist: the model
            to compare against; default: the registry's pointer under `evaluate.gate.registry` (or
            `<output>/registry`).
  pointer   optional promoted pointer that may not exist yet (nothing promoted): compared against when
            it exists, created by the first promotion otherwise. The pipelines pass their
            `promoted_pointer` parameter this way.

Output: an `eval` artifact with results.json (every score, each model's manifest digest, task
versions and settings, harness versions, the gate's verdict), report.md, report.html (self-contained)
and headline numbers in `metrics`. Nothing is published unless every model and task was evaluated.
The gate judges the candidate (last model, or `gate.candidate`) before publishing; its verdict is then
applied (`registry.apply_gate`): pass -> the pointer is moved (conditional write); fail ->
GateFailedError naming task and numbers, the report stays published, the pointer stays put. The
pipelines call `run(..., apply_gate=False)` and apply the verdict in a gate step of their own, so the
evaluate step succeeds and its report reaches the KFP UI either way.

Like with like: each task's settings (`task_settings`, `perplexity_settings`) are recorded; a max_drop
rule whose baseline score came from other settings has the promoted model re-scored in this run.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import json
import logging
import math
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubellm.core.errors import ConfigError, InputDataError, KubellmError
from kubellm.core.manifest import (
    MANIFEST_NAME,
    Manifest,
    content_prefix,
    fetch,
    is_plain_hf_dir,
    load_manifest_ref,
    publish_dir,
    stable_hash,
)
from kubellm.core.storage import is_s3, join, sha256_file, storage_for
from kubellm.evaluate import harness, registry
from kubellm.evaluate.config import BUNDLED_TASKS, EvaluateConfig
from kubellm.evaluate.metrics import PERPLEXITY_DIRECTIONS, is_stderr
from kubellm.evaluate.perplexity import shard_perplexity
from kubellm.evaluate.report import render_html, render_markdown
from kubellm.evaluate.taskdata import METADATA_KEY, TASK_FILES, data_dir, read_items
from kubellm.tokenizer.shards import TokenShardReader

log = logging.getLogger(__name__)

_LABELLED = re.compile(r"^([A-Za-z][\w.-]*):(?!//)(.+)$")
KNOWN_STAGES = ("pretrain", "sft", "dpo")
MAX_CURVE_POINTS = 500


@dataclasses.dataclass
class ModelInput:
    label: str
    ref: str
    manifest: Manifest | None = None
    local_dir: Path | None = None
    root: Path | None = None
    """Where the artifact's files were fetched (the HF dir may be a subdirectory, e.g. `hf/`)."""
    digest: str = ""
    uri: str = ""


def parse_models(value: str) -> list[ModelInput]:
    """`base:s3://b/pretrain/ab,sft:/art/sft/cd,/models/hf` -> labelled inputs (labels resolved later)."""
    items = [s.strip() for s in value.split(",") if s.strip()]
    if not items:
        raise ConfigError("input 'models': empty; expected a comma-separated list of [label:]ref")
    out = []
    for item in items:
        m = _LABELLED.match(item)
        out.append(ModelInput(m.group(1), m.group(2)) if m else ModelInput("", item))
    parts = value.split(",")  # "base:/m/run,1/hf" splits into refs that do not exist
    for i in range(len(parts)):
        m = _LABELLED.match(parts[i].strip())
        first = (m.group(2) if m else parts[i]).lstrip()
        if Path(first.strip()).exists():
            continue  # the part names a path as it is
        for j in range(i + 1, len(parts)):
            joined = ",".join([first, *parts[i + 1 : j + 1]]).rstrip()
            if not is_s3(joined) and Path(joined).exists():
                raise ConfigError(f"input 'models': {joined!r} contains a comma, which separates models in this "
                                  "input; give the model a path without one (rename it or point a symlink at it)")
    labels = [mi.label for mi in out if mi.label]
    dup = sorted({lbl for lbl in labels if labels.count(lbl) > 1})
    if dup:
        raise ConfigError(f"input 'models': label(s) {dup} given to more than one model; each model needs its "
                          "own label (it names the model's row, its parent entry and the gate candidate)")
    return out


def _dir_digest(d: Path) -> str:
    files = sorted(p for p in d.rglob("*") if p.is_file())
    return "dir-" + stable_hash([(p.relative_to(d).as_posix(), sha256_file(p)) for p in files])


def _hf_dir(root: Path, manifest: Manifest) -> Path:
    hint = manifest.metadata.get("export_path") or manifest.metadata.get("hf_dir")
    if hint:
        return root / str(hint)
    if (root / "config.json").is_file():
        return root
    found = sorted({(root / f.path).parent for f in manifest.files
                    if f.path == "config.json" or f.path.endswith("/config.json")})
    if len(found) != 1:
        raise InputDataError(f"{manifest.uri}: model artifact holds {len(found)} HF export dirs "
                             f"({[str(p.relative_to(root)) for p in found]}); expected exactly one")
    return found[0]


def resolve_model(mi: ModelInput, work: Path, index: int) -> None:
    """Fetch (and verify) a model artifact, or take a plain local HF dir; fill dir, digest, label."""
    p = Path(mi.ref)
    local_dir = not is_s3(mi.ref) and p.is_dir() and not (p / MANIFEST_NAME).exists()
    if is_plain_hf_dir(mi.ref):
        mi.local_dir, mi.uri, mi.digest = p.resolve(), str(p.resolve()), _dir_digest(p)
        mi.root = mi.local_dir
        mi.label = mi.label or p.name
    elif local_dir and len([q for q in p.iterdir() if q.suffix == ".json"]) != 1:
        # not a KFP artifact dir holding one manifest JSON either: say what an export lacks
        harness.check_hf_export(p)
        raise InputDataError(f"{p}: neither a kubellm model artifact nor an HF export")
    else:
        m = load_manifest_ref(mi.ref)
        if m.kind != "model":
            raise InputDataError(f"models input {mi.ref}: artifact kind is {m.kind!r}, expected 'model'")
        dest = work / f"model{index}"
        fetch(m, dest)
        mi.root = dest
        mi.manifest, mi.uri, mi.digest = m, m.uri, m.digest()
        mi.local_dir = _hf_dir(dest, m)
        parts = m.uri.rstrip("/").split("/")
        stage = str(m.metadata.get("stage") or (parts[-2] if len(parts) >= 2 else ""))
        mi.label = mi.label or (stage if stage in KNOWN_STAGES else f"model{index}")
    harness.check_hf_export(mi.local_dir)


def loss_curve(mi: ModelInput) -> list[list[float]]:
    """(step, loss) pairs from the model manifest's `metadata.loss_curve` or its metrics JSONL. The curve
    is only drawn in the report: a point that is not two numbers is skipped, with one warning naming
    where it came from, never an error after the model was scored."""
    pts: list[list[float]] = []
    bad: dict[str, int] = {}

    def point(step: Any, loss: Any, where: str) -> None:
        if all(isinstance(x, int | float) and not isinstance(x, bool) for x in (step, loss)):
            pts.append([float(step), float(loss)])
        else:
            bad[where] = bad.get(where, 0) + 1

    if mi.manifest is not None and isinstance(mi.manifest.metadata.get("loss_curve"), list):
        for p in mi.manifest.metadata["loss_curve"]:
            step, loss = p if isinstance(p, list | tuple) and len(p) == 2 else (None, None)
            point(step, loss, f"{mi.uri} metadata.loss_curve")
    elif mi.root is not None:
        # the engine's per-step metrics JSONL (model stages ship it as metrics/metrics.jsonl)
        for f in sorted(mi.root.rglob("*metrics*.jsonl")):
            for line in f.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "step" in rec and "loss" in rec:
                    point(rec["step"], rec["loss"], str(f))
    for where, n in bad.items():
        log.warning("%s: %d loss-curve point(s) are not (step, loss) numbers; left out of the plot", where, n)
    stride = max(1, len(pts) // MAX_CURVE_POINTS)
    return pts[::stride]


def _unique_labels(models: list[ModelInput], explicit: set[int]) -> None:
    """Make every label distinct. Explicit labels (`label:ref`) were checked unique by `parse_models`
    and are kept; a default label that collides gets the first free `-2`, `-3`, … suffix (never one
    that another model already uses, so every model keeps its own row, parent and gate identity)."""
    taken = {models[i].label for i in explicit}
    for i, mi in enumerate(models):
        if i in explicit:
            continue
        label, n = mi.label, 1
        while label in taken:
            n += 1
            label = f"{mi.label}-{n}"
        mi.label = label
        taken.add(label)


def stage_eval_dir(cfg: EvaluateConfig, work: Path) -> Path:
    """The bundled tasks' data dir, staged locally when it is an S3 prefix."""
    if cfg.eval_dir and is_s3(cfg.eval_dir):
        dest = work / "eval_data"
        st = storage_for(cfg.eval_dir)
        for task in cfg.tasks:
            if task not in TASK_FILES:
                continue
            uri = join(cfg.eval_dir, TASK_FILES[task])
            if not st.exists(uri):  # name the S3 object, not the local staging path
                raise InputDataError(f"{uri}: eval data file for task {task} not found "
                                     f"(evaluate.eval_dir {cfg.eval_dir})")
            st.download(uri, dest / TASK_FILES[task])
        return dest
    return data_dir(cfg.eval_dir)


@dataclasses.dataclass
class ValidationTokens:
    """The tokens input's validation shards and what their ids mean."""

    paths: list[Path]
    digest: str
    uri: str
    vocab_size: int
    """Largest vocab_size among the shard headers."""
    vocab: dict[str, int] | None
    """The artifact's tokenizer vocabulary (token -> id), when the artifact ships its tokenizer."""


def validation_shards(ref: str, work: Path) -> ValidationTokens:
    m = load_manifest_ref(ref)
    if m.kind != "token_shards":
        raise InputDataError(f"tokens input {ref}: artifact kind is {m.kind!r}, expected 'token_shards'")
    paths = [f.path for f in m.files if f.path.startswith("validation/") and f.path.endswith(".tok")]
    if not paths:
        raise InputDataError(f"tokens input {m.uri}: no validation/*.tok shards for held-out perplexity "
                             "(was the dataset made with validation_fraction 0?)")
    tdir = str(m.metadata.get("tokenizer_dir") or "").strip("/")
    tok_files = [f.path for f in m.files if tdir and f.path.startswith(tdir + "/")]
    fetch(m, work / "tokens", paths + tok_files)
    local = [work / "tokens" / p for p in sorted(paths)]
    readers = [TokenShardReader(p, scan=False) for p in local]  # ids are checked as perplexity reads them
    for r in readers:
        r.check_offsets()  # a corrupt offset table fails before any model is evaluated
    if sum(r.token_count - r.doc_count for r in readers) <= 0:
        raise InputDataError(f"tokens input {m.uri}: the validation shards {sorted(paths)} hold no predictable "
                             "tokens (no documents); held-out perplexity needs a validation split")
    vocab = None
    if tok_files:
        from transformers import AutoTokenizer

        vocab = dict(AutoTokenizer.from_pretrained(str(work / "tokens" / tdir)).get_vocab())
    return ValidationTokens(local, m.digest(), m.uri, max(r.vocab_size for r in readers), vocab)


def check_same_tokenizer(mi: ModelInput, tokens: ValidationTokens, seq_len: int) -> None:
    """Refuse a model whose tokenizer is not the one the validation shards were encoded with (its
    perplexity would be computed on ids that mean other tokens to it: a silently wrong number), or
    whose position range is shorter than the perplexity window."""
    from transformers import AutoTokenizer

    assert mi.local_dir is not None
    conf = json.loads((mi.local_dir / "config.json").read_text())  # check_hf_export read it already
    positions = conf.get("max_position_embeddings")
    if isinstance(positions, int) and seq_len > positions:  # windows past the trained positions
        raise ConfigError(
            f"evaluate.perplexity_seq_len {seq_len} exceeds model {mi.label}'s max_position_embeddings "
            f"{positions} ({mi.uri}): its perplexity would be scored on positions it was never trained on; "
            f"set evaluate.perplexity_seq_len ≤ {positions}")
    mine = dict(AutoTokenizer.from_pretrained(str(mi.local_dir)).get_vocab())
    where = f"model {mi.label} ({mi.uri})"
    if tokens.vocab is not None:
        if mine != tokens.vocab:
            differ = len(set(mine.items()) ^ set(tokens.vocab.items()))
            raise InputDataError(
                f"{where}: its tokenizer ({len(mine)} tokens) is not the tokens input's tokenizer "
                f"({len(tokens.vocab)} tokens, {tokens.uri}; {differ} token/id pairs differ): held-out "
                "perplexity on those shards would score the wrong tokens")
    elif len(mine) != tokens.vocab_size:
        raise InputDataError(
            f"{where}: its tokenizer has {len(mine)} tokens but the tokens input's validation shards "
            f"({tokens.uri}) were encoded with a {tokens.vocab_size}-token vocabulary: held-out perplexity "
            "would score the wrong tokens")


def headline_metric(cfg: EvaluateConfig, task: str, have: Mapping[str, float]) -> str:
    """The metric of `task` shown as its column and judged by rules without `metric:`. One the user set
    in `evaluate.headline` must be reported: as written, or as the single `<metric>/<filter>` lm-eval
    reports for it (gsm8k's `exact_match` is `exact_match/strict-match` and `.../flexible-extract`:
    ambiguous, so refused); a typo is refused, naming what the task reports, not replaced."""
    reported = [k for k in have if not is_stderr(k)]
    if task in cfg.headline:
        return reported_metric(f"evaluate.headline.{task}", task, cfg.headline[task], have)
    metric = cfg.headline_metric(task)
    if metric is not None and metric in have:
        return metric
    return next((k for k in ("acc_norm", "acc", "exact_match", "f1") if k in have), reported[0])


def reported_metric(field: str, task: str, metric: str, have: Mapping[str, float]) -> str:
    """`metric` as `task` reports it: as written, or the single `<metric>/<filter>` lm-eval reports for
    it; ConfigError naming `field` and what the task reports otherwise (a typo, or ambiguous)."""
    if metric in have:
        return metric
    reported = [k for k in have if not is_stderr(k)]
    filtered = [k for k in reported if k.startswith(f"{metric}/")]
    if len(filtered) == 1:
        return filtered[0]
    raise ConfigError(f"{field}: {metric!r} is {'ambiguous' if filtered else 'not reported'} "
                      f"for {task}; it reports {sorted(reported)}")


def _columns(cfg: EvaluateConfig, models: list[dict[str, Any]]) -> list[tuple[str, str]]:
    cols = []
    for task in cfg.tasks + ["perplexity"]:
        have = next((m["scores"][task] for m in models if task in m["scores"]), None)
        if have is not None:
            cols.append((task, headline_metric(cfg, task, have)))
    return cols


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float as None: strict JSON (results.json, manifest metrics, the
    pointer) has no NaN/Infinity, and pydantic would write them as null into float fields it then
    refuses to read back."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def print_summary(manifest: Manifest) -> str:
    """The score table and the HTML report's location for an eval artifact (for `kubellm run --local`)."""
    from kubellm.core.manifest import read_verified
    from kubellm.evaluate.report import summary

    results = json.loads(read_verified(manifest, "results.json"))  # the verdict as committed, nothing else
    text = summary(results, manifest.file_uri("report.html"))
    print(text)
    return text


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
PERPLEXITY_VERSION = 1
"""Version of kubellm's held-out perplexity (kubellm.evaluate.perplexity); bump when its numbers change."""


def _scrub(obj: Any) -> Any:
    """A dumped lm-eval task config without what varies between runs of the same settings: the eval
    data's local directory (a temp dir for an s3:// eval_dir; the content is hashed on its own), the
    YAML's path, and object addresses in the repr of a callable."""
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in obj.items() if k not in (METADATA_KEY, "config_source")}
    if isinstance(obj, list | tuple):
        return [_scrub(v) for v in obj]
    if isinstance(obj, str):
        return _ADDRESS.sub("", obj)
    return obj


def task_settings(cfg: EvaluateConfig, task: str, res: harness.HarnessResult, data: dict[str, Any] | None,
                  lm_eval: str) -> dict[str, Any]:
    """What shapes one lm-eval task's numbers: task version, a hash of its config as lm-eval ran it (the
    YAML with its prompts, splits, metrics, n-shot and hook sources), the items' content, limit,
    n-shot, chat template, seed, dtype and the lm-eval version. Two runs whose settings are equal
    score a model alike on this task; batch size, device and bootstrap_iters only add float noise or
    change the stderr, and are left out."""
    return {"lm_eval": lm_eval, "version": res.versions.get(task), "config": stable_hash(_scrub(res.configs.get(task, {}))),
            "data": data["sha256"] if data else None, "items": data["items"] if data else None,
            "limit": cfg.limit, "n_shot": res.n_shot.get(task), "chat": res.chat.get(task), "seed": cfg.seed,
            "dtype": cfg.dtype, "scoring": bundled_scoring_hash() if task in BUNDLED_TASKS else None}


@functools.cache
def bundled_scoring_hash() -> str:
    """sha256 of the code that loads and scores the bundled tasks beyond their YAML (`taskdata`'s row
    checks, which the YAML's loaders call, and `tasks/utils.py`): a change to it changes the settings,
    so a max_drop rule never compares scores computed by different code."""
    from kubellm.evaluate import taskdata

    h = hashlib.sha256()
    for f in (Path(taskdata.__file__), Path(taskdata.__file__).parent / "tasks" / "utils.py"):
        h.update(f.read_bytes())
    return h.hexdigest()


def perplexity_settings(cfg: EvaluateConfig, tokens_digest: str) -> dict[str, Any]:
    """What shapes held-out perplexity: the validation shards' content, the window, the token cap, dtype."""
    return {"version": PERPLEXITY_VERSION, "tokens": tokens_digest, "seq_len": cfg.perplexity_seq_len,
            "max_tokens": cfg.perplexity_max_tokens, "dtype": cfg.dtype}


def _show(key: str, v: Any) -> str:
    return f"{v[:12]}…" if isinstance(v, str) and len(v) == 64 else repr(v)


def settings_diff(mine: Mapping[str, Any], theirs: Mapping[str, Any] | None) -> str:
    """'' when equal, else what differs (`limit 2 → 4; version 1.0 → 2.0`: the baseline's → this run's)."""
    if theirs is None:
        return "the promoted pointer records no settings for it (promoted before kubellm recorded them)"
    return "; ".join(f"{k} {_show(k, theirs.get(k))} → {_show(k, mine.get(k))}"
                     for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k))


def _skip_perplexity_rule(cfg: EvaluateConfig, inputs: Mapping[str, str]) -> dict[str, str]:
    """A perplexity rule without a tokens input: an error for a run that may promote; skipped (and said
    so in the report) for one that never does — the scheduled report has no tokens input."""
    if not (cfg.gate.enabled and "perplexity" in cfg.gate.rules and not inputs.get("tokens")):
        return {}
    if cfg.gate.promote:
        raise ConfigError("evaluate.gate.rules has a perplexity rule but no tokens input was given: held-out "
                          "perplexity needs --input tokens=<token_shards artifact> (or drop the rule)")
    return {"perplexity": "skipped: no tokens input, so held-out perplexity was not measured; this run never "
                          "promotes (gate.promote false), so its perplexity rule is not applied"}


def run(config: EvaluateConfig, inputs: Mapping[str, str], output: str, *, apply_gate: bool = True) -> Manifest:
    """Evaluate, publish the eval artifact, then apply its gate verdict (`registry.apply_gate`): fail ->
    GateFailedError, pass -> the pointer moves. `apply_gate=False` (the pipelines' evaluate step) stops
    after publishing: the verdict is in the artifact and a separate gate step applies it, so the report
    reaches the KFP UI whether or not the gate passes."""
    cfg = config
    models = parse_models(inputs["models"])
    skipped = _skip_perplexity_rule(cfg, inputs)
    rules = {t: r for t, r in cfg.gate.rules.items() if t not in skipped}

    import torch

    harness.check_device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))  # before any fetch
    with tempfile.TemporaryDirectory(prefix="kubellm-eval-") as tmp:
        work = Path(tmp)
        ddir = stage_eval_dir(cfg, work)
        tm = harness.task_manager(cfg.tasks, ddir)  # unknown task names fail before any model is loaded
        eval_data = {}
        for task in (t for t in cfg.tasks if t in BUNDLED_TASKS):
            n = len(read_items(task, ddir))  # a malformed row fails here, naming file and line
            f = ddir / TASK_FILES[task]
            # content, not the path: with an s3:// eval_dir the local copy is in a fresh temp dir
            uri = join(cfg.eval_dir, TASK_FILES[task]) if cfg.eval_dir and is_s3(cfg.eval_dir) else str(f)
            eval_data[task] = {"uri": uri, "sha256": sha256_file(f), "items": n}

        pointer = inputs.get("baseline") or inputs.get("pointer")
        reg = registry.Registry.from_pointer(pointer) if pointer else \
            registry.Registry(cfg.gate.registry or join(output, "registry"), cfg.gate.name)
        current = reg.current()
        if inputs.get("baseline") and current is None:
            raise InputDataError(f"baseline {inputs['baseline']}: no promoted pointer there (to name where "
                                 "the first promotion goes, pass it as --input pointer=… instead)")
        if current is None:
            log.info("no model promoted at %s yet: the gate applies its min/max rules only", reg.pointer_uri)

        explicit = {i for i, mi in enumerate(models) if mi.label}
        for i, mi in enumerate(models):
            resolve_model(mi, work, i)
        _unique_labels(models, explicit)
        candidate = cfg.gate.candidate or models[-1].label
        if candidate not in {m.label for m in models}:  # before any model is evaluated
            raise ConfigError(f"evaluate.gate.candidate: {candidate!r} is not one of the models "
                              f"{[m.label for m in models]}")
        val = validation_shards(inputs["tokens"], work) if inputs.get("tokens") else None
        if val is not None:  # before any model is evaluated
            for mi in models:
                check_same_tokenizer(mi, val, cfg.perplexity_seq_len)
        shards, tokens_digest = (val.paths, val.digest) if val else ([], "")
        lm_eval_version = harness.harness_version()["lm_eval"]

        results_models: list[dict[str, Any]] = []
        task_info: dict[str, dict[str, Any]] = {}
        settings: dict[str, dict[str, Any]] = {}
        for mi in models:
            assert mi.local_dir is not None
            log.info("evaluating %s (%s)", mi.label, mi.uri)
            scores, res = _score(mi, cfg, tm, None, shards)
            for t, have in scores.items():  # a headline typo fails after the first model, not the last
                headline_metric(cfg, t, have)
            for t, rule in list(rules.items()):  # so does a rule's (lm-eval's own tasks: known only now)
                if rule.metric is not None and t in scores:
                    resolved = reported_metric(f"evaluate.gate.rules.{t}.metric", t, rule.metric, scores[t])
                    rules[t] = rule.model_copy(update={"metric": resolved})
            for t in res.scores:
                task_info[t] = {"version": res.versions[t], "n_shot": res.n_shot[t],
                                "n_samples": res.n_samples[t], "chat": res.chat[t],
                                "higher_is_better": res.higher_is_better[t]} | (
                    {"data": eval_data[t]} if t in eval_data else {})
                settings.setdefault(t, task_settings(cfg, t, res, eval_data.get(t), lm_eval_version))
            results_models.append({"label": mi.label, "ref": mi.ref, "uri": mi.uri, "digest": mi.digest,
                                   "kind": mi.manifest.kind if mi.manifest else "hf_dir",
                                   "scores": scores, "loss_curve": loss_curve(mi)})
        if shards:
            task_info["perplexity"] = {"version": PERPLEXITY_VERSION, "n_shot": 0, "chat": False,
                                       "n_samples": int(results_models[0]["scores"]["perplexity"]["tokens"]),
                                       "higher_is_better": dict(PERPLEXITY_DIRECTIONS), "tokens_digest": tokens_digest}
            settings["perplexity"] = perplexity_settings(cfg, tokens_digest)

        columns = _columns(cfg, results_models)
        headline = {t: m for t, m in columns}
        settings_hash = stable_hash(settings)
        directions = {t: info.get("higher_is_better", {}) for t, info in task_info.items()}
        base = _baseline(cfg, current, rules, models, results_models, settings, work, tm, val) if current else None
        cand = next(m for m in results_models if m["label"] == candidate)
        verdict = registry.judge(cand["scores"], current.entry if current else None, rules, headline,
                                 current.uri if current else "", directions=directions,
                                 baseline_scores=base["scores"] if base else None,
                                 unlike=base["unlike"] if base else None) if cfg.gate.enabled else None
        will_promote = bool(verdict and verdict.passed and cfg.gate.promote)
        if will_promote and not rules:
            log.warning("evaluate.gate.rules is empty: %s is promoted whatever it scores; add rules (e.g. "
                        "kubellm_knowledge: {max_drop: 0.02}) to keep a worse model from replacing the promoted one",
                        candidate)

        parents = {f"model:{m.label}": m.digest for m in models}
        if tokens_digest:
            parents["tokens"] = tokens_digest
        if current:
            parents["baseline"] = current.entry.model_digest
        results: dict[str, Any] = {
            "harness": harness.harness_version(),
            "settings": cfg.model_dump(mode="json"),
            "settings_hash": settings_hash,
            "task_settings": settings,
            "columns": columns,
            "tasks": task_info,
            "models": results_models,
            "baseline": ({"pointer": current.uri, "label": current.entry.label,
                          "model_uri": current.entry.model_uri, "model_digest": current.entry.model_digest}
                         | base if current and base else None),
            "deltas": ({m["label"]: {t: m["scores"][t][k] - base["scores"][t][k]
                                     for t, k in columns if k in base["scores"].get(t, {})
                                     and k in m["scores"].get(t, {})}
                        for m in results_models} if base else {}),
            "gate": ({"candidate": candidate, "pointer": reg.pointer_uri, "promote": cfg.gate.promote,
                      "promoted": will_promote, "skipped": skipped} | verdict.to_json()) if verdict else None,
        }
        # Content-addressed by everything that shapes the artifact — and by its content, so a re-run
        # whose numbers differ (nondeterministic kernels) gets its own prefix instead of a conflict.
        gate_key: dict[str, Any] = {"cfg": cfg.model_dump(mode="json"), "settings": settings_hash,
                                    "results": stable_hash(json_safe(results))}
        if pointer:  # a registry named by the input, not the config: the report records which one
            gate_key["pointer"] = reg.pointer_uri
        config_hash = stable_hash(gate_key)
        prefix = content_prefix(output, "evaluate", config_hash, parents)

        md = render_markdown(results)
        out_dir = work / "out"
        out_dir.mkdir()
        (out_dir / "results.json").write_text(json.dumps(json_safe(results), indent=2, sort_keys=True,
                                                         allow_nan=False))
        (out_dir / "report.md").write_text(md)
        (out_dir / "report.html").write_text(render_html(results))

        metrics = {f"{m['label']}/{t}/{k}": float(m["scores"][t][k])  # a nan is in the report, not here
                   for m in results_models for t, k in columns
                   if k in m["scores"].get(t, {}) and math.isfinite(m["scores"][t][k])}
        if verdict:
            metrics["gate_passed"] = float(verdict.passed)
        manifest = publish_dir(
            out_dir, prefix, kind="eval", metrics=metrics, config_hash=config_hash, parents=parents,
            counts={"models": len(models), "tasks": len(columns)},
            metadata={"results": "results.json", "report_html": "report.html", "report_md": "report.md",
                      "candidate": candidate, "gate_passed": verdict.passed if verdict else None,
                      "pointer": reg.pointer_uri, "headline": headline},
            report_markdown=md,
        )

    if apply_gate:
        registry.apply_gate(manifest)
    return manifest


def _score(mi: ModelInput, cfg: EvaluateConfig, tm: Any, tasks: list[str] | None,
           shards: list[Path]) -> tuple[dict[str, dict[str, float]], harness.HarnessResult]:
    """One model's scores on `tasks` (None: every task) and, with `shards`, held-out perplexity."""
    assert mi.local_dir is not None
    lm = harness.load_model(mi.local_dir, cfg)
    res = harness.evaluate_lm(lm, cfg, tm, tasks) if tasks is None or tasks else \
        harness.HarnessResult({}, {}, {}, {}, {}, {})
    scores = dict(res.scores)
    if shards:
        scores["perplexity"] = shard_perplexity(
            lm.model, shards, seq_len=cfg.perplexity_seq_len, batch_size=cfg.batch_size,
            max_tokens=cfg.perplexity_max_tokens)
    del lm
    gc.collect()
    return scores, res


def _baseline(cfg: EvaluateConfig, current: registry.Current, rules: Mapping[str, Any], models: list[ModelInput],
              results_models: list[dict[str, Any]], settings: dict[str, dict[str, Any]], work: Path, tm: Any,
              val: ValidationTokens | None) -> dict[str, Any]:
    """The baseline's scores to compare against, and where they come from.

    The pointer's scores are used for every task whose recorded settings equal this run's. Where they
    differ, or the pointer has no score for the task (added since), and a max_drop rule needs the task,
    the promoted model is re-scored in this run under this
    run's settings (taken from this run's results when the promoted model is one of the models
    evaluated, else fetched and evaluated on those tasks): a drop is only measured between numbers
    scored alike. Tasks that differ but no max_drop rule needs keep the pointer's scores, flagged."""
    entry = current.entry
    unlike = {t: d for t in settings if t in entry.scores and (d := settings_diff(settings[t], entry.eval_settings.get(t)))}
    # a task evaluated now that the pointer has no score for (added since the promotion)
    absent = sorted(t for t in settings if t not in entry.scores)
    scores = {t: dict(v) for t, v in entry.scores.items()}
    needed = sorted(t for t, r in rules.items() if r.max_drop is not None and (t in unlike or t in absent)) \
        if cfg.gate.enabled else []
    rescored: dict[str, str] = {}
    if needed:
        same = next((m for m in results_models if m["digest"] == entry.model_digest), None)
        if same is not None:
            fresh, how = same["scores"], f"scored in this run as model {same['label']}"
        else:
            fresh, how = _rescore(cfg, current, sorted(set(unlike) | {t for t in absent if t in needed}), needed,
                                  models, work, tm, val), "re-scored in this run"
        for t in sorted(unlike):
            if t in fresh:
                scores[t] = dict(fresh[t])
                rescored[t] = f"{how} (the pointer's score came from other settings: {unlike.pop(t)})"
        for t in absent:
            if t in needed and t in fresh:
                scores[t] = dict(fresh[t])
                rescored[t] = f"{how} (the pointer has no score for it)"
    return {"scores": scores, "unlike": unlike, "rescored": rescored, "same_settings": not unlike,
            "settings": entry.eval_settings}


def _rescore(cfg: EvaluateConfig, current: registry.Current, tasks: list[str], needed: list[str],
             models: list[ModelInput], work: Path, tm: Any, val: ValidationTokens | None) -> dict[str, dict[str, float]]:
    """The promoted model's scores on `tasks` under this run's settings (`needed`: the max_drop tasks
    that cannot be judged without them)."""
    entry = current.entry
    why = (f"the gate's max_drop rule(s) on {needed} compare against the promoted model {entry.label or '?'} "
           f"({entry.model_uri}, pointer {current.uri}), whose recorded scores came from other evaluation "
           "settings or lack the task, so kubellm re-scores it in this run")
    mi = ModelInput("promoted", entry.model_uri)
    try:
        resolve_model(mi, work, len(models))
    except (InputDataError, KubellmError) as e:
        raise InputDataError(f"{why}; it could not be read: {e}") from e
    if mi.digest != entry.model_digest:
        raise InputDataError(f"{why}; but {entry.model_uri} now holds other content (digest {mi.digest[:12]}, "
                             f"the pointer records {entry.model_digest[:12]})")
    shards: list[Path] = []
    if val is not None and "perplexity" in tasks:
        try:
            check_same_tokenizer(mi, val, cfg.perplexity_seq_len)
            shards = val.paths
        except (InputDataError, ConfigError) as e:
            if "perplexity" in needed:
                raise InputDataError(f"{why}; its held-out perplexity cannot be measured on this run's "
                                     f"tokens: {e}") from e
    log.info("re-scoring the promoted model %s (%s) on %s under this run's settings", entry.label, mi.uri, tasks)
    scores, _ = _score(mi, cfg, tm, [t for t in tasks if t != "perplexity"], shards)
    return scores
