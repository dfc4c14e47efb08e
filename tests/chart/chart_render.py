"""Render charts/kubellm with the real Helm engine (helm-python-sdk embeds Helm's Go library).

Shared by the chart tests and tests/test_no_secrets_chart.py:

    from chart_render import render_chart, render_objects
    text = render_chart(values)           # the manifests as `helm template` would print them
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubellm"
VALUES_DIR = Path(__file__).resolve().parent / "values"
RELEASE = "kubellm"
NAMESPACE = "kubeflow"


def load_values(name: str) -> dict[str, Any]:
    data = yaml.safe_load((VALUES_DIR / f"{name}.yaml").read_text())
    return data or {}


def render_templates(values: dict[str, Any], *, upgrade: bool = False, release: str = RELEASE) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included), offline, as an install or upgrade."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(
            values=values, name=release, namespace=NAMESPACE, revision=2 if upgrade else 1,
            is_install=not upgrade, is_upgrade=upgrade,
        )


def render_chart(values: dict[str, Any], release: str = RELEASE) -> str:
    """All manifests in template-path order with `# Source:` headers (stable: golden files diff it)."""
    parts = []
    for path, text in sorted(render_templates(values, release=release).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in text.split("\n---"):
            body = doc.strip("\n-")
            if body.strip():
                parts.append(f"---\n# Source: {path}\n{body.rstrip()}\n")
    return "".join(parts)


def render_objects(values: dict[str, Any], release: str = RELEASE) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render_chart(values, release)) if d]
