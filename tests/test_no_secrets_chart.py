"""No credential ever reaches the rendered chart.

Fake credentials are planted in the environment of the process that renders (as on a CI runner or a
laptop with AWS creds exported); every values file is rendered with the real Helm engine and the
output (manifests and NOTES) is scanned for the planted values, their base64 forms, and
credential-shaped strings. The chart itself may only *reference* the credentials Secret.
"""

from __future__ import annotations

import base64
import re
import sys
from pathlib import Path

import helm_python as helm
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "chart"))
from chart_render import CHART, VALUES_DIR, load_values, render_templates  # noqa: E402

PLANTED = {
    "AWS_ACCESS_KEY_ID": "AKIAKUBELLMPLANTED01",
    "AWS_SECRET_ACCESS_KEY": "kubellm/planted+SecretAccessKey/0123456789abcdef",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEKubellmPlantedSessionToken0123456789",
    "KUBELLM_S3_SECRET_KEY": "planted-kubellm-s3-secret-value",
    "MINIO_ROOT_PASSWORD": "planted-minio-root-password",
    "HF_TOKEN": "hf_kubellmPlantedHubToken0123456789",
    "KFP_TOKEN": "planted-kfp-bearer-token-0123456789",
}
CREDENTIAL_SHAPES = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    re.compile(r"(?i)(aws_secret_access_key|secretAccessKey|password|token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}"),
]


def _needles() -> list[str]:
    out = []
    for value in PLANTED.values():
        out += [value, base64.b64encode(value.encode()).decode()]
    return out


@pytest.fixture
def planted_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in PLANTED.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("name", sorted(p.stem for p in VALUES_DIR.glob("*.yaml")))
def test_rendered_chart_contains_no_credentials(name: str, planted_env: None) -> None:
    rendered = render_templates(load_values(name))
    upgrade = render_templates(load_values(name), upgrade=True)
    for path, text in [*rendered.items(), *upgrade.items()]:
        for needle in _needles():
            assert needle not in text, f"{name}: {path} contains a planted credential"
        for shape in CREDENTIAL_SHAPES:
            assert not shape.search(text), f"{name}: {path} contains something credential-shaped: {shape.pattern}"
    assert not any("kind: Secret\n" in text for text in rendered.values()), "the chart never creates a Secret"


def test_templates_cannot_read_the_environment_or_cluster_secrets() -> None:
    # `env`/`expandenv` would copy the renderer's environment into manifests; `lookup` could copy a
    # live Secret's data into a ConfigMap on a real install.
    for tpl in (CHART / "templates").iterdir():
        text = tpl.read_text()
        for func in (r"\benv\s+\"", r"\bexpandenv\b", r"\blookup\b", r"\.Files\.Get"):
            assert not re.search(func, text), f"{tpl.name} uses {func}"


@pytest.mark.parametrize(
    "values",
    [
        {"s3": {"credentials": {"accessKeyId": PLANTED["AWS_ACCESS_KEY_ID"]}}},
        {"s3": {"credentials": {"secretAccessKey": PLANTED["AWS_SECRET_ACCESS_KEY"]}}},
        {"s3": {"accessKey": "x", "secretKey": "y"}},
    ],
)
def test_values_have_no_place_for_credential_values(values: dict) -> None:
    with pytest.raises(helm.HelmValuesError):
        render_templates(values)
