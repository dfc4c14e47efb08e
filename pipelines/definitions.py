"""The pipelines: `llm_from_scratch` (every stage) and `evaluation_report` (the scheduled report).

    from kubellm.pipelines.definitions import build_pipelines, PipelineSettings
    from kubellm.runconfig import load_run_config
    pipes = build_pipelines(load_run_config(preset="debug"), PipelineSettings(tag="abc123"))
    kfp.compiler.Compiler().compile(pipes["llm_from_scratch"], "llm_from_scratch.yaml")

Pipelines are built by a factory, not at import: the run-config's sections become the pipeline
parameters' *defaults* (what the Kubeflow UI pre-fills) and the image registry/tag is a compile-time
setting, both known only when `kubellm compile`/`run`/`submit` is called.

Caching (ARCHITECTURE §3): each stage gets only its own section (`<stage>_config`), so a change to
one stage's knobs re-runs that stage and what follows it; raw sources and the promoted-model pointer
are resolved by small uncached steps whose fingerprints are parameters of the cached stages.

Data prep fan-out (ARCHITECTURE §5): with `data_prep.fan_out: true` in the run-config (or the
compile-time setting `--param data_prep_parallelism=N`, N > 1) the one data-prep step becomes
`list-shards` (cached on the raw fingerprint) -> `dsl.ParallelFor(parallelism=N)` over
`prepare-shard` (one pod per input shard) -> `dedup-reduce` (gathers the map with `dsl.Collected`,
global dedup, publishes the same `dataset` artifact the tokenizer reads). kfp.local (2.16.1) runs a
ParallelFor but not a step after one in the same DAG, so `kubellm run --local` keeps the single step
(same artifact: the fan-out settings are left out of the data-prep config hash).
"""

# No `from __future__ import annotations`: kfp reads the annotations as types, not strings.

import dataclasses
import json
import re
from typing import Any

from kfp import dsl
from kfp import kubernetes as k8s

from kubellm.core.config import merge_config
from kubellm.core.errors import ConfigError
from kubellm.core.images import PULL_SECRETS_ENV, TRAIN_IMAGE_ENV, image_for
from kubellm.core.storage import S3_ENV_VARS
from kubellm.pipelines import components as c
from kubellm.pipelines.fingerprint import default_pointer
from kubellm.runconfig import STAGES, RunConfig

PIPELINES = ("llm_from_scratch", "evaluation_report")
PIPELINE_NAMES = {"llm_from_scratch": "llm-from-scratch", "evaluation_report": "evaluation-report"}
TRAINING_STAGES = ("pretrain", "sft", "dpo")


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """Compile-time settings that are not run-config knobs (where images and credentials come from)."""

    registry: str | None = None
    """Image registry (None: KUBELLM_REGISTRY); see kubellm.core.images.image_for."""
    tag: str | None = None
    """Image tag (None: KUBELLM_TAG, else the kubellm version)."""
    s3_secret: str = "kubellm-s3"
    """Kubernetes Secret whose AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY become the steps' env
    (referenced by name, optional: workload identity needs none). Empty: no Secret reference."""
    s3_secret_keys: tuple[str, str] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    """Keys in that Secret holding the access key id and the secret access key."""
    s3_config_map: str = "kubellm-env"
    """ConfigMap with the S3 settings kubellm.core.storage reads (the Helm chart's `<fullname>-env`;
    optional, every key optional). Empty: no reference."""
    raw_source: str = ""
    """Default of the `raw_source` parameter (raw corpus: local path/glob or s3:// prefix); empty:
    the run-config's `sources.raw`."""
    chat_source: str = ""
    """Default of the `chat_source` parameter (SFT chat data); empty: `sources.chat`."""
    preferences_source: str = ""
    """Default of the `preferences_source` parameter (DPO preference pairs); empty: `sources.preferences`."""
    params: tuple[tuple[str, Any], ...] = ()
    """Further parameter-default overrides (name, value), applied last (`data_prep_parallelism` among
    them is taken as the compile-time setting below)."""
    resources: Any = None
    """The run-config's `pipeline` section (`PipelineConfig`): each kind of step's pod resources;
    set by build_pipelines from the run-config."""
    image_pull_secrets: tuple[str, ...] = ()
    """Image pull Secrets (by name) of every step's pod (`kfp.kubernetes.set_image_pull_secrets`); a
    training step hands them on to its PyTorchJob's pods ($KUBELLM_IMAGE_PULL_SECRETS)."""
    retries: int = 2
    """KFP retries per task (`set_retry`, backoff 30 s doubling, within an hour); 0: none."""
    data_prep_parallelism: int | None = None
    """Data-prep fan-out: > 1 fans the per-shard work out over that many concurrent pods, 1 forces the
    single step, None follows the run-config (`data_prep.fan_out`, `data_prep.fan_out_parallelism`).
    Compile-time: it shapes the DAG, so it is not a run parameter."""


DEFAULT_RETRIES = PipelineSettings.retries
MAX_RETRIES = 10

#: Run-config `sources` field -> the pipeline parameter it is the default of.
SOURCE_PARAMS = {"raw": "raw_source", "chat": "chat_source", "preferences": "preferences_source"}

FAN_OUT_SETTING = "data_prep_parallelism"


def data_prep_fan_out(cfg: RunConfig, settings: PipelineSettings) -> int | None:
    """The ParallelFor parallelism of the data-prep fan-out (0 = unlimited), or None for one step."""
    n = settings.data_prep_parallelism
    for name, value in settings.params:
        if name == FAN_OUT_SETTING:
            try:
                n = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"{FAN_OUT_SETTING}={value!r}: expected an integer (>1 fans data prep "
                                 "out, 1 keeps one step)") from None
    if n is not None:
        return n if n > 1 else None
    dp = cfg.data_prep
    return dp.fan_out_parallelism if dp.fan_out else None


def section_json(cfg: RunConfig, stage: str) -> str:
    """A stage's section as canonical JSON: the string parameter its component receives."""
    return json.dumps(cfg.section(stage).model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def parameter_defaults(cfg: RunConfig, settings: PipelineSettings) -> dict[str, dict[str, Any]]:
    """Parameter name -> default, per pipeline. The one place defaults come from."""
    root = cfg.storage.root
    gate = getattr(cfg.evaluate, "gate", None)
    pointer = default_pointer(root, getattr(gate, "registry", None), getattr(gate, "name", "kubellm"))
    full: dict[str, Any] = {
        "storage_root": root,
        **{p: getattr(settings, p) or getattr(cfg.sources, k) for k, p in SOURCE_PARAMS.items()},
        "promoted_pointer": pointer,
        **{f"{s}_config": section_json(cfg, s) for s in STAGES},
    }
    report: dict[str, Any] = {
        "storage_root": root,
        "model_uris": [],
        "promoted_pointer": pointer,
        "tokens": "",
        "evaluate_config": report_only(section_json(cfg, "evaluate")),
    }
    out = {"llm_from_scratch": full, "evaluation_report": report}
    for name, value in settings.params:
        if name == FAN_OUT_SETTING:
            continue  # compile-time (see data_prep_fan_out)
        hits = [p for p in out.values() if name in p]
        if not hits:
            known = sorted(set(full) | set(report))
            raise ValueError(f"unknown pipeline parameter {name!r}: expected one of {', '.join(known)}")
        for p in hits:
            p[name] = check_param(name, value, p[name])
    report["evaluate_config"] = report_only(report["evaluate_config"])  # a --param evaluate_config too
    for params in out.values():
        for name, value in params.items():
            _refuse_url_credentials(name, value)
    return out


_URL_WITH_PASSWORD = re.compile(r"[A-Za-z][\w+.-]*://[^/@\s\"',]*:[^/@\s\"',]*@[^/\s\"',]*"
                                r"|(?i:https?)://[^/@\s\"',]+@[^/\s\"',]*")  # http(s): a token alone is one too


def _refuse_url_credentials(name: str, value: Any, flag: str = "") -> None:
    """Parameter defaults are shown in the KFP UI and stored in the pipeline YAML, run arguments
    (`--arg`) in the run (and a schedule's every run), shown in the UI too: a URL carrying
    `user:password@` (an endpoint, a storage root, a source) would publish the password."""
    from kubellm.core.storage import redact

    text = value if isinstance(value, str) else json.dumps(value)
    urls = sorted(set(_URL_WITH_PASSWORD.findall(text)))
    if urls:
        where = (f"{flag} {name}" if flag else f"pipeline parameter {name}")
        stored = ("run arguments are stored with the run and shown in the KFP UI" if flag
                  else "parameters are stored in the pipeline YAML and shown in the KFP UI")
        raise ConfigError(f"{where}: a URL carries credentials ({', '.join(redact(u) for u in urls)}): "
                          f"{stored}; give credentials "
                          "through the environment or a Kubernetes Secret (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                          "--s3-secret) and the URL without them")


def _promotes(evaluate_config: str) -> bool:
    from kubellm.pipelines.runtime import parse_section

    return bool(parse_section("evaluate", evaluate_config).gate.promote)


def report_only(evaluate_config: str) -> str:
    """The evaluation_report pipeline's evaluate section with `gate.promote` false: a scheduled report
    judges but never moves the pointer (it may evaluate arbitrary models)."""
    from kubellm.pipelines.runtime import parse_section

    data = parse_section("evaluate", evaluate_config).model_dump(mode="json")
    data["gate"]["promote"] = False
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def check_param(name: str, value: Any, default: Any, flag: str = "--param") -> Any:
    """A `--param NAME=VALUE` value in the parameter's type (that of its default), or a ConfigError
    naming it. A `<stage>_config` given as a JSON object (or mapping text) is merged over the default
    section — the run-config's, so `--param dpo_config='{"beta": 0.2}'` changes beta and keeps every
    other field — and validated like the component will (so a bad field fails here, not in a pod); it
    becomes that section's JSON string. A list parameter needs a list."""
    import yaml

    from kubellm.pipelines.runtime import parse_section

    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"{flag} {name}={value!r}: expected a JSON list, e.g. "
                              f"{flag} '{name}=[\"s3://bucket/prefix\"]'")
        return value
    stage = name.removesuffix("_config")
    if name.endswith("_config") and stage in STAGES:
        over = value
        if isinstance(value, str):
            try:
                over = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError:
                over = None  # parse_section below says what is wrong with it
        if isinstance(over, dict) and isinstance(default, str) and default.strip():
            try:
                base_model = parse_section(stage, default)
            except ConfigError:
                base_model = None
            if base_model is not None:
                merged = merge_config(type(base_model), base_model.model_dump(mode="json"), over)
                value = merged
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
        try:
            parse_section(stage, text)
        except ConfigError as e:
            raise ConfigError(str(e).replace(f"pipeline parameter {name}", f"{flag} {name}", 1)) from None
        return text
    if not isinstance(value, str):
        raise ConfigError(f"{flag} {name}={json.dumps(value)}: expected a string, not JSON")
    return value


def check_arguments(pipeline: str, values: dict[str, Any], defaults: dict[str, Any],
                    flag: str = "--param") -> dict[str, Any]:
    """Run arguments (`--param`/`--arg NAME=VALUE`) checked against the pipeline's parameters: each
    name must be one of them and each value of its type (`check_param`)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in defaults:
            raise ConfigError(f"{flag} {name}: not a parameter of {pipeline}: expected one of "
                              f"{', '.join(sorted(defaults))}")
        out[name] = check_param(name, value, defaults[name], flag)
        _refuse_url_credentials(name, out[name], flag)
        if pipeline == "evaluation_report" and name == "evaluate_config" and _promotes(out[name]):
            raise ConfigError(f"{flag} evaluate_config: the evaluation_report pipeline never promotes (it may "
                              "evaluate arbitrary models); set gate.promote: false in it, or promote through "
                              "llm_from_scratch")
    return out


def _configure(task: dsl.PipelineTask, stage: str, settings: PipelineSettings, *, display: str,
               cache: bool = True, run_identity: bool = False) -> dsl.PipelineTask:
    """Image, caching, S3 env (by reference) and, for training stages, the run identity."""
    task.set_container_image(image_for(stage, registry=settings.registry, tag=settings.tag))
    task.set_display_name(display)
    task.set_caching_options(cache)
    _apply_resources(task, getattr(settings.resources, stage, None))
    if settings.image_pull_secrets:
        k8s.set_image_pull_secrets(task, list(settings.image_pull_secrets))
        task.set_env_variable(PULL_SECRETS_ENV, ",".join(settings.image_pull_secrets))  # for the training jobs
    if settings.retries:  # every step is idempotent: content-addressed outputs, re-attaching training jobs
        task.set_retry(settings.retries, backoff_duration="30s", backoff_factor=2.0, backoff_max_duration="3600s")
    if settings.s3_secret:
        key_id, secret_key = settings.s3_secret_keys
        k8s.use_secret_as_env(task, settings.s3_secret, {key_id: "AWS_ACCESS_KEY_ID",
                                                         secret_key: "AWS_SECRET_ACCESS_KEY"}, optional=True)
    if settings.s3_config_map:
        k8s.use_config_map_as_env(task, settings.s3_config_map, {k: k for k in S3_ENV_VARS}, optional=True)
    if stage in TRAINING_STAGES:
        # What the step's PyTorchJob needs from this compile (kubellm.training.job.cluster_defaults):
        # the workers run this very image, and reach S3 through the same Secret and ConfigMap (names only).
        task.set_env_variable(TRAIN_IMAGE_ENV, image_for(stage, registry=settings.registry, tag=settings.tag))
        task.set_env_variable("KUBELLM_S3_SECRET_NAME", settings.s3_secret)
        task.set_env_variable("KUBELLM_S3_SECRET_KEYS", ",".join(settings.s3_secret_keys))
        task.set_env_variable("KUBELLM_S3_CONFIG_MAP", settings.s3_config_map)
    if stage in TRAINING_STAGES or run_identity:
        # The launcher derives run-scoped checkpoint prefixes and idempotent PyTorchJob names from
        # these; env (not parameters) so they do not enter the cache key.
        k8s.use_field_path_as_env(task, "KUBELLM_KFP_RUN_ID", "metadata.labels['pipeline/runid']")
        k8s.use_field_path_as_env(task, "KUBELLM_WORKFLOW_NAME",
                                  "metadata.labels['workflows.argoproj.io/workflow']")
        k8s.use_field_path_as_env(task, "KUBELLM_POD_NAME", "metadata.name")
        k8s.use_field_path_as_env(task, "KUBELLM_POD_UID", "metadata.uid")
        k8s.use_field_path_as_env(task, "KUBELLM_NAMESPACE", "metadata.namespace")
    return task


def _apply_resources(task: dsl.PipelineTask, r: Any) -> None:
    """A `StepResources` onto the task's pod (nothing set: the cluster's defaults)."""
    if r is None:
        return
    for value, setter in ((r.cpu_request, task.set_cpu_request), (r.cpu_limit, task.set_cpu_limit),
                          (r.memory_request, task.set_memory_request), (r.memory_limit, task.set_memory_limit)):
        if value:
            setter(value)
    if r.accelerator_limit:
        task.set_accelerator_type(r.accelerator_type)
        task.set_accelerator_limit(r.accelerator_limit)
    for key, value in sorted(r.node_selector.items()):
        k8s.add_node_selector(task, key, value)
    for t in r.tolerations:
        k8s.add_toleration(task, key=t.key or None, operator=t.operator, value=t.value or None,
                           effect=t.effect or None)


def _data_prep_fan_out(s: PipelineSettings, parallelism: int, config: Any, storage_root: Any, raw: Any,
                       raw_fingerprint: Any) -> Any:
    """list-shards -> ParallelFor(prepare-shard) -> dedup-reduce; returns the reduce's dataset output."""
    # list-shards gets the run identity: the work prefix is named after the run that listed the shards.
    # It is cached on the raw fingerprint and config, so a later (or concurrent) run of the same sources
    # and config reuses the first run's listing and so its work prefix; dedup-reduce tolerates the other
    # run publishing the dataset and deleting the prefix meanwhile (README "Data prep at scale").
    shards = _configure(c.list_shards(config=config, storage_root=storage_root, raw=raw,
                                      raw_fingerprint=raw_fingerprint), "data_prep", s,
                        display="data prep: list shards", run_identity=True)
    with dsl.ParallelFor(shards.output, parallelism=parallelism) as shard:
        prepared = _configure(c.prepare_shard(config=config, shard=shard), "data_prep", s,
                              display="data prep: prepare shard")
    reduce = _configure(c.dedup_reduce(config=config, storage_root=storage_root, shards=shards.output,
                                       prepared=dsl.Collected(prepared.output)), "data_prep", s,
                        display="data prep: dedup reduce")
    return reduce.outputs["dataset"]


def build_pipelines(cfg: RunConfig, settings: PipelineSettings | None = None,
                    until: str | None = None) -> dict[str, Any]:
    """Both pipelines, with `cfg`'s values as parameter defaults and `settings`' images.
    `until` ends llm_from_scratch after that stage (e.g. iterate on data prep without training)."""
    if until is not None and until not in STAGES:
        raise ValueError(f"unknown stage {until!r} for until: expected one of {', '.join(STAGES)}")
    s = dataclasses.replace(settings or PipelineSettings(), resources=cfg.pipeline)
    d = parameter_defaults(cfg, s)
    fan_out = data_prep_fan_out(cfg, s)
    f, r = d["llm_from_scratch"], d["evaluation_report"]

    @dsl.pipeline(name=PIPELINE_NAMES["llm_from_scratch"],
                  description=f"kubellm: raw text -> data prep -> tokenizer -> pretrain -> SFT -> DPO -> "
                              f"evaluation and gate (run-config {cfg.name})")
    def llm_from_scratch(
        storage_root: str = f["storage_root"],
        raw_source: str = f["raw_source"],
        chat_source: str = f["chat_source"],
        preferences_source: str = f["preferences_source"],
        promoted_pointer: str = f["promoted_pointer"],
        data_prep_config: str = f["data_prep_config"],
        tokenizer_config: str = f["tokenizer_config"],
        pretrain_config: str = f["pretrain_config"],
        sft_config: str = f["sft_config"],
        dpo_config: str = f["dpo_config"],
        evaluate_config: str = f["evaluate_config"],
    ) -> None:
        raw_fp = _configure(c.fingerprint_source(source=raw_source, name="raw_source"), "base", s,
                            display="fingerprint raw corpus", cache=False)
        if fan_out is None:
            dataset = _configure(c.data_prep(config=data_prep_config, storage_root=storage_root, raw=raw_source,
                                             raw_fingerprint=raw_fp.output), "data_prep", s,
                                 display="data prep").outputs["dataset"]
        else:
            dataset = _data_prep_fan_out(s, fan_out, data_prep_config, storage_root, raw_source, raw_fp.output)
        if until == "data_prep":
            return
        tok = _configure(c.tokenizer(config=tokenizer_config, storage_root=storage_root,
                                     dataset=dataset), "tokenizer", s, display="tokenizer")
        if until == "tokenizer":
            return
        base = _configure(c.pretrain(config=pretrain_config, storage_root=storage_root,
                                     tokens=tok.outputs["tokens"]), "pretrain", s, display="pretrain")
        if until == "pretrain":
            return
        chat_fp = _configure(c.fingerprint_source(source=chat_source, name="chat_source"), "base", s,
                             display="fingerprint chat data", cache=False)
        tuned = _configure(c.sft(config=sft_config, storage_root=storage_root, model=base.outputs["model"],
                                 chat=chat_source, chat_fingerprint=chat_fp.output), "sft", s, display="SFT")
        if until == "sft":
            return
        pref_fp = _configure(c.fingerprint_source(source=preferences_source, name="preferences_source"), "base", s,
                             display="fingerprint preference data", cache=False)
        aligned = _configure(c.dpo(config=dpo_config, storage_root=storage_root, model=tuned.outputs["sft_model"],
                                   preferences=preferences_source, preferences_fingerprint=pref_fp.output),
                             "dpo", s, display="DPO")
        if until == "dpo":
            return
        promoted = _configure(c.resolve_promoted(promoted_pointer=promoted_pointer), "base", s,
                              display="resolve promoted model", cache=False)
        evaluated = _configure(c.evaluate(config=evaluate_config, storage_root=storage_root,
                                          base_model=base.outputs["model"], sft_model=tuned.outputs["sft_model"],
                                          dpo_model=aligned.outputs["dpo_model"], tokens=tok.outputs["tokens"],
                                          baseline=promoted.outputs["pointer"],
                                          baseline_fingerprint=promoted.outputs["fingerprint"]),
                               "evaluate", s, display="evaluate")
        # evaluate always succeeds and publishes its report (KFP uploads no outputs of a failed task);
        # this step fails the run when the gate failed, and is the one that moves the pointer
        _configure(c.gate(results=evaluated.outputs["results"], promote=True), "base", s,
                   display="promotion gate", cache=False)

    @dsl.pipeline(name=PIPELINE_NAMES["evaluation_report"],
                  description="kubellm: evaluate registered models (default: the promoted one) and publish "
                              "the report; meant to run on a schedule with caching off")
    def evaluation_report(
        storage_root: str = r["storage_root"],
        model_uris: list = r["model_uris"],
        promoted_pointer: str = r["promoted_pointer"],
        tokens: str = r["tokens"],
        evaluate_config: str = r["evaluate_config"],
    ) -> None:
        resolved = _configure(c.resolve_models(model_uris=model_uris, promoted_pointer=promoted_pointer),
                              "base", s, display="resolve models", cache=False)
        evaluated = _configure(c.evaluate_models(config=evaluate_config, storage_root=storage_root,
                                                 models=resolved.outputs["models"],
                                                 baseline=resolved.outputs["baseline"],
                                                 models_fingerprint=resolved.outputs["fingerprint"], tokens=tokens),
                               "evaluate", s, display="evaluation report", cache=False)  # a report re-evaluates
        # the report is in the UI either way; a failed gate still fails the run (it never promotes)
        _configure(c.gate(results=evaluated.outputs["results"], promote=False), "base", s,
                   display="gate verdict", cache=False)

    return {"llm_from_scratch": llm_from_scratch, "evaluation_report": evaluation_report}
