"""What the chart's documentation states matches the chart: object names and the minimum KFP version."""

from __future__ import annotations

import re

import yaml
from chart_render import CHART, render_objects

ROOT = CHART.parents[1]
# The KFP backend must read what the kfp / kfp-kubernetes SDK (2.16) compiles: 2.15 is the first
# whose driver reads `optional` on Secrets and ConfigMaps as env (an older one refuses the whole task:
# kubeflow/pipelines#12495); `dsl.Collected` parameters need 2.14, and 2.3 was already the first whose
# launcher gives non-root steps writable /s3, /minio, /gcs (kubeflow/pipelines#10857).
MIN_KFP = (2, 15)


def test_chart_readme_names_the_objects_the_chart_renders() -> None:
    readme = (CHART / "README.md").read_text()
    assert not re.search(r"`<release>-(?!kubellm`)", readme), "objects are named <fullname>-..., not <release>-..."
    sha = "9fceb02d0ae598e95dc970b74767f19372d61af8"
    values = {
        "serviceAccount": {"create": True},
        "pipelineRunner": {"multiUser": {"enabled": True, "namespaces": ["team-a"]}},
        "schedule": {"enabled": True, "namespace": "team-a"},
        "gitops": {"enabled": True, "gitSha": sha, "namespace": "team-a"},
        "trainingOperator": {"initContainerTemplate": {"create": True}},
    }
    names = {o["metadata"]["name"] for o in render_objects(values, release="ml")}
    documented = re.findall(r"`<fullname>(-[-a-z0-9<>]+)`", readme)
    assert len(documented) >= 6
    for suffix in documented:
        name = "ml-kubellm" + suffix.replace("<sha12>", sha[:12])
        assert name in names, f"charts/kubellm/README.md documents {suffix!r}; release 'ml' renders {sorted(names)}"
    assert "`ml-kubellm-env`" in readme and "ml-kubellm-env" in names
    assert "kubellm-env" in {o["metadata"]["name"] for o in render_objects({}, release="kubellm")}


def _min_kfp(text: str) -> tuple[int, int]:
    m = re.search(r"Kubeflow Pipelines\s*(?:\(\s*)?>=\s*(\d+)\.(\d+)", text)
    assert m, "no 'Kubeflow Pipelines >= X.Y' stated"
    return int(m.group(1)), int(m.group(2))


def test_stated_minimum_kfp_version_is_the_one_the_compiled_pipeline_needs() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert _min_kfp(chart["annotations"]["kubellm.io/requires"]) == MIN_KFP
    assert _min_kfp((CHART / "README.md").read_text()) == MIN_KFP
    prerequisites = (ROOT / "README.md").read_text().split("Prerequisites:", 1)[1][:400]
    assert _min_kfp(prerequisites) == MIN_KFP
