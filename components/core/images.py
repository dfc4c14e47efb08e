"""Which container image runs each stage: the ONE registry/tag setting the KFP components read.

    from kubellm.core.images import image_for
    image_for("pretrain")                    # "kubellm-train:0.1.0"
    image_for("evaluate", registry="registry.example.com/ml", tag="abc123")
                                             # "registry.example.com/ml/kubellm-eval:abc123"

    KUBELLM_REGISTRY=registry.example.com/ml KUBELLM_TAG=abc123 \
    KUBELLM_IMAGE_DIGEST_TRAIN=sha256:<64 hex> kubellm compile ...
                                             # ".../kubellm-train:abc123@sha256:<64 hex>"

Three images exist (images/*.Dockerfile, built by `make images` with the same two variables):
`base` (data prep, tokenizer, every small step), `train` (CUDA torch + DeepSpeed: pretrain, SFT,
DPO workers and their launcher) and `eval` (lm-eval). A digest pins an image by content; the tag
stays in the reference for people reading it (the runtime pulls by digest).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from importlib import metadata

from kubellm.core.errors import ConfigError

IMAGES = ("base", "train", "eval")
TRAIN_IMAGE_ENV = "KUBELLM_TRAIN_IMAGE"
"""Set by the compiled pipeline on its training steps: the exact image reference (registry, tag,
digest) the step itself runs, which its PyTorchJob's workers run too."""
PULL_SECRETS_ENV = "KUBELLM_IMAGE_PULL_SECRETS"
"""Image pull Secrets (comma-separated names) for the pods kubellm creates: pipeline steps (compile
time) and, from a training step, its PyTorchJob's pods."""


def pull_secret_names(names: Iterable[str] | None = None, env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Image pull Secret names, stripped, blanks dropped, each once: `names` when given, else the
    comma-separated $KUBELLM_IMAGE_PULL_SECRETS of `env` (default: this process's environment)."""
    if names is None:
        names = (os.environ if env is None else env).get(PULL_SECRETS_ENV, "").split(",")
    return tuple(dict.fromkeys(n.strip() for n in names if n.strip()))

# Stage (or step) name -> image. Stages not listed here run on the base image.
STAGE_IMAGES: dict[str, str] = {
    "data_prep": "base",
    "tokenizer": "base",
    "pretrain": "train",
    "sft": "train",
    "dpo": "train",
    "launcher": "train",
    "evaluate": "eval",
    "report": "eval",
}

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
# registry host[:port] and path components, lower case (Docker reference grammar, simplified).
_REGISTRY = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*$")


def default_tag() -> str:
    """The installed kubellm version: `make images` tags with it unless KUBELLM_TAG is set."""
    try:
        return metadata.version("kubellm")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "latest"


def image_name(stage: str) -> str:
    """`base`, `train` or `eval` for a stage name (or an image name itself)."""
    key = stage.replace("-", "_")
    if key in IMAGES:
        return key
    return STAGE_IMAGES.get(key, "base")


def image_for(
    stage: str,
    registry: str | None = None,
    tag: str | None = None,
    digest: str | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Full image reference for `stage`; arguments win over the environment.

    Environment: KUBELLM_REGISTRY (empty = local names), KUBELLM_TAG (default: kubellm's version),
    KUBELLM_IMAGE_DIGEST_<BASE|TRAIN|EVAL> (optional `sha256:<hex>` per image).
    Raises ConfigError naming the setting when a value is malformed.
    """
    env = os.environ if env is None else env
    image = image_name(stage)
    registry = (env.get("KUBELLM_REGISTRY", "") if registry is None else registry).strip().rstrip("/")
    tag = (env.get("KUBELLM_TAG") or default_tag()) if tag is None else tag
    digest_var = f"KUBELLM_IMAGE_DIGEST_{image.upper()}"
    digest = (env.get(digest_var) or None) if digest is None else (digest or None)

    if registry and not _REGISTRY.match(registry):
        raise ConfigError(
            f"KUBELLM_REGISTRY={registry!r} is not a registry path: expected lower-case "
            "'host[:port]/path', e.g. 'registry.example.com/ml' or 'ghcr.io/org'"
        )
    if not _TAG.match(tag):
        raise ConfigError(
            f"KUBELLM_TAG={tag!r} is not an image tag: expected up to 128 of [A-Za-z0-9_.-], "
            "not starting with '.' or '-'"
        )
    if digest is not None and not _DIGEST.match(digest):
        raise ConfigError(f"{digest_var}={digest!r} is not a digest: expected 'sha256:' + 64 lower-case hex digits")

    ref = f"kubellm-{image}:{tag}"
    if registry:
        ref = f"{registry}/{ref}"
    if digest:
        ref = f"{ref}@{digest}"
    return ref


def all_images(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`{"base": ref, "train": ref, "eval": ref}` under the current settings."""
    return {name: image_for(name, env=env) for name in IMAGES}
