"""kubellm.core.images: one registry/tag setting picks every stage's image; digests pin them."""

from __future__ import annotations

import pytest

from kubellm.core.errors import ConfigError
from kubellm.core.images import all_images, default_tag, image_for
from kubellm.stages import STAGES

DIGEST = "sha256:" + "ab" * 32


def test_defaults_are_local_names_tagged_with_the_package_version() -> None:
    assert image_for("pretrain", env={}) == f"kubellm-train:{default_tag()}"
    assert image_for("data_prep", env={}) == f"kubellm-base:{default_tag()}"
    assert image_for("evaluate", env={}) == f"kubellm-eval:{default_tag()}"


def test_every_registered_stage_has_an_image() -> None:
    expect = {"data_prep": "base", "tokenizer": "base", "pretrain": "train", "sft": "train", "dpo": "train",
              "evaluate": "eval"}
    for name in STAGES:
        assert image_for(name, env={"KUBELLM_TAG": "t"}) == f"kubellm-{expect[name]}:t"


def test_environment_sets_registry_tag_and_per_image_digest() -> None:
    env = {"KUBELLM_REGISTRY": "registry.example.com:5000/ml/", "KUBELLM_TAG": "abc123",
           "KUBELLM_IMAGE_DIGEST_TRAIN": DIGEST}
    assert image_for("sft", env=env) == f"registry.example.com:5000/ml/kubellm-train:abc123@{DIGEST}"
    assert image_for("tokenizer", env=env) == "registry.example.com:5000/ml/kubellm-base:abc123"
    assert all_images(env)["eval"] == "registry.example.com:5000/ml/kubellm-eval:abc123"


def test_arguments_override_environment() -> None:
    env = {"KUBELLM_REGISTRY": "a.io/x", "KUBELLM_TAG": "envtag", "KUBELLM_IMAGE_DIGEST_EVAL": DIGEST}
    assert image_for("evaluate", registry="", tag="v1", digest="", env=env) == "kubellm-eval:v1"
    assert image_for("base", registry="ghcr.io/org", env=env) == "ghcr.io/org/kubellm-base:envtag"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"registry": "Registry.Example.com/ML"}, "KUBELLM_REGISTRY"),
        ({"registry": "reg.io/a b"}, "KUBELLM_REGISTRY"),
        ({"tag": "-bad"}, "KUBELLM_TAG"),
        ({"tag": "has:colon"}, "KUBELLM_TAG"),
        ({"digest": "sha256:1234"}, "KUBELLM_IMAGE_DIGEST_TRAIN"),
        ({"digest": "md5:" + "a" * 32}, "KUBELLM_IMAGE_DIGEST_TRAIN"),
    ],
)
def test_malformed_settings_name_the_variable(kwargs: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        image_for("pretrain", env={}, **kwargs)
