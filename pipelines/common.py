"""Options shared by `kubellm compile|run|submit|schedule`: the run-config, images, parameter defaults.

    kubellm compile --preset debug --set pretrain.train.max_steps=20 --registry reg.io/ml --tag v1 \
        --param raw_source=s3://bucket/raw/ --output build/pipelines
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

from kubellm.core.errors import ConfigError
from kubellm.core.images import PULL_SECRETS_ENV, pull_secret_names
from kubellm.core.storage import check_output_dir
from kubellm.pipelines.definitions import (
    DEFAULT_RETRIES,
    MAX_RETRIES,
    PIPELINES,
    SOURCE_PARAMS,
    PipelineSettings,
    build_pipelines,
)
from kubellm.runconfig import PRESETS, RunConfig, load_run_config
from kubellm.training.pytorchjob.settings import dns1123_subdomain_problem


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-config", "--config", dest="run_config", metavar="FILE",
                   help="run-config YAML; its values become the pipeline parameters' defaults")
    p.add_argument("--preset", choices=PRESETS, help="start from a shipped preset (the file overrides it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config value, e.g. --set dpo.beta=0.2 (repeatable)")


def add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default=None,
                   help="image registry for every step (default: $KUBELLM_REGISTRY, else local names)")
    p.add_argument("--tag", default=None, help="image tag for every step (default: $KUBELLM_TAG, else the version)")
    p.add_argument("--s3-secret", default=os.environ.get("KUBELLM_S3_SECRET_NAME", "kubellm-s3"),
                   help="Secret (by name) with the S3 access key pair for the steps; '' for none (workload "
                        "identity). Default: $KUBELLM_S3_SECRET_NAME (set by the Helm chart), else kubellm-s3")
    p.add_argument("--image-pull-secret", dest="image_pull_secrets", action="append", default=None, metavar="NAME",
                   help="image pull Secret (by name) for every step's pod and the training jobs' pods; repeatable. "
                        "Default: $KUBELLM_IMAGE_PULL_SECRETS (comma-separated; set by the Helm chart from "
                        "images.pullSecrets), else none")
    p.add_argument("--s3-config-map", default=os.environ.get("KUBELLM_S3_CONFIG_MAP", "kubellm-env"),
                   help="ConfigMap with KUBELLM_S3_ENDPOINT_URL, AWS_REGION, ... for the steps (the chart's "
                        "<fullname>-env); '' for none. Default: $KUBELLM_S3_CONFIG_MAP (set by the Helm chart), "
                        "else kubellm-env")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES, metavar="N",
                   help="KFP retries of every step whose container fails (S3/API errors, an evicted pod): "
                        "stages are idempotent and a training step re-attaches to its PyTorchJob or resumes "
                        "from its checkpoint; backoff 30 s doubling. KFP retries only within an hour of a step's "
                        "first start (it caps backoff_max_duration at 3600 s; a retry running at that mark is "
                        "stopped), and not a pod lost with its node (an Argo error): training then resumes when "
                        f"the run is retried or re-submitted. 0: none (default {DEFAULT_RETRIES})")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="set a pipeline parameter's default, e.g. --param raw_source=s3://b/raw/ "
                        "(JSON values are parsed: --param 'model_uris=[\"s3://b/m\"]')")


def parse_params(items: list[str], flag: str = "--param") -> dict[str, Any]:
    """`NAME=VALUE` items -> {name: value}; a value starting with `[` or `{` is parsed as JSON, any other
    (an empty one included: `tokens=`) is the string. Errors name `flag` (`--param`, `--arg`)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{flag} {item!r}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        try:
            val: Any = json.loads(v) if v.startswith(("[", "{")) else v
        except json.JSONDecodeError as e:
            raise ConfigError(f"{flag} {k}: value looks like JSON but does not parse: {e}") from None
        out[k.strip()] = val
    return out


def load_config(args: argparse.Namespace) -> RunConfig:
    return load_run_config(args.run_config, preset=args.preset, overrides=args.set)


def check_image_flags(registry: str | None, tag: str | None) -> None:
    """`--registry`/`--tag` checked as given, so a malformed one is refused naming the flag (image_for
    names KUBELLM_REGISTRY/KUBELLM_TAG, which is right only when the value came from the environment)."""
    from kubellm.core.images import image_for

    for flag, value in (("--registry", registry), ("--tag", tag)):
        if value is None:
            continue
        try:
            image_for("base", registry=value if flag == "--registry" else "",
                      tag=value if flag == "--tag" else "latest", digest="", env={})
        except ConfigError as e:
            # "KUBELLM_TAG='x y' is not an image tag: ..." -> "--tag 'x y' is not an image tag: ..."
            _, sep, why = str(e).partition(" is not ")
            raise ConfigError(f"{flag} {value!r} is not {why}" if sep else f"{flag} {value!r}: {e}") from None


def settings_from_args(args: argparse.Namespace, **extra: Any) -> PipelineSettings:
    check_image_flags(getattr(args, "registry", None), getattr(args, "tag", None))
    params = parse_params(getattr(args, "param", []) or [])
    for key in SOURCE_PARAMS.values():
        if key in params:
            value = params.pop(key)
            if not isinstance(value, str):  # str() of a JSON list would compile its Python repr
                raise ConfigError(f"--param {key}={json.dumps(value)}: expected a string, not JSON (several "
                                  f"sources: one comma-separated string, --param '{key}=s3://b/a/,s3://b/b/')")
            extra.setdefault(key, value)
    env = os.environ
    retries = getattr(args, "retries", DEFAULT_RETRIES)
    if not 0 <= retries <= MAX_RETRIES:
        raise ConfigError(f"--retries {retries}: must be a whole number from 0 to {MAX_RETRIES}")
    pull_secrets = pull_secret_names(getattr(args, "image_pull_secrets", None), env)
    for name in pull_secrets:
        if problem := dns1123_subdomain_problem(name):
            raise ConfigError(f"image pull Secret {name!r} (--image-pull-secret / ${PULL_SECRETS_ENV}): {problem}")
    return PipelineSettings(registry=getattr(args, "registry", None), tag=getattr(args, "tag", None),
                            retries=retries, image_pull_secrets=pull_secrets,
                            s3_secret=getattr(args, "s3_secret", "kubellm-s3"),
                            s3_config_map=getattr(args, "s3_config_map", "kubellm-env"),
                            s3_secret_keys=(env.get("KUBELLM_S3_SECRET_ACCESS_KEY_ID_KEY", "AWS_ACCESS_KEY_ID"),
                                            env.get("KUBELLM_S3_SECRET_SECRET_ACCESS_KEY_KEY",
                                                    "AWS_SECRET_ACCESS_KEY")),
                            params=tuple(params.items()), **extra)


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

#: parameters that name data every step must reach: on a cluster, object storage (or the hub)
CLUSTER_PATH_PARAMS = ("storage_root", "promoted_pointer", "tokens", "model_uris", *SOURCE_PARAMS.values())


def check_cluster_paths(pipeline: str, arguments: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse, before a run reaches the cluster, a local path (or a URL that is not s3://) where every
    step must read or write: on Kubeflow each step runs in its own pod, so a directory on this machine
    (or in one pod) is not shared — the tokenizer would not find data prep's output, a promotion would
    vanish with its pod. Sources may also be `hf:` datasets, not S3 globs (data prep reads no glob on
    S3); a model may carry the evaluate stage's `label:` prefix. Values are echoed redacted."""
    from kubellm.core.storage import redact
    from kubellm.data_prep.sources import HUB_SCHEME
    from kubellm.pipelines.fingerprint import refuse_s3_glob, strip_label

    local: list[str] = []
    other: list[str] = []
    for name in CLUSTER_PATH_PARAMS:
        if name not in defaults:
            continue
        value = arguments.get(name, defaults[name])
        for item in (value if isinstance(value, list) else str(value).split(",")):
            item = str(item).strip()
            if name == "model_uris":
                item = strip_label(item)
            if not item:
                continue
            if name in SOURCE_PARAMS.values():
                refuse_s3_glob(item, name)
                if item.startswith(HUB_SCHEME):
                    continue
            if not item.startswith("s3://"):
                (other if _URL_SCHEME.match(item) else local).append(f"{name}={redact(item)!r}")
    problems = []
    if local:
        problems.append(f"{', '.join(local)} {'is a local path' if len(local) == 1 else 'are local paths'}")
    if other:
        problems.append(f"{', '.join(other)} {'is a URL' if len(other) == 1 else 'are URLs'} that kubellm's "
                        "steps cannot share (only s3:// is supported)")
    if problems:
        raise ConfigError(
            f"{pipeline}: {'; '.join(problems)}: on Kubeflow every step runs in its own pod "
            "and shares no filesystem with the others; use s3://bucket/prefix (storage.root and sources.* in the "
            "run-config, or --param/--arg NAME=s3://…)")


def compile_pipelines(cfg: RunConfig, settings: PipelineSettings, out_dir: Path | str,
                      names: tuple[str, ...] = PIPELINES) -> dict[str, Path]:
    """Write `<name>.yaml` (KFP IR) for each pipeline into `out_dir`."""
    from kfp import compiler

    try:
        pipes = build_pipelines(cfg, settings)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = Path(out_dir)
    check_output_dir(out)
    blocked = [str(out / f"{n}.yaml") for n in names if (out / f"{n}.yaml").is_dir()]
    if blocked:  # checked before any file is written
        raise ConfigError(f"--output {str(out)!r}: {', '.join(blocked)} is a directory, not a file")
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        path = out / f"{name}.yaml"
        compiler.Compiler().compile(pipes[name], str(path))
        paths[name] = path
    return paths
