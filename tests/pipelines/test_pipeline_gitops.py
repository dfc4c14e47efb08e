"""The GitOps examples call `kubellm submit` with arguments it accepts, once per commit."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import yaml

from kubellm.pipelines import submit

GITOPS = Path(__file__).resolve().parents[2] / "pipelines" / "gitops"


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    submit.configure(p, "submit")
    return p.parse_args(argv)


def test_ci_workflow_submits_once_per_commit() -> None:
    wf = yaml.safe_load((GITOPS / "github-actions-retrain.yaml").read_text())
    assert wf[True]["push"]["branches"] == ["main"]  # YAML 1.1 reads the key `on` as True
    step = next(s for s in wf["jobs"]["submit"]["steps"] if "kubellm submit" in s.get("run", ""))
    argv = shlex.split(step["run"].replace("\\\n", " "))[2:]
    args = _parse(argv)
    assert args.git_sha == "${{ github.sha }}" and args.upload and args.run_config
    assert "KUBELLM_KFP_TOKEN" in step["env"] and "TOKEN" not in step["run"]  # secret via env only


def test_argocd_hook_job() -> None:
    docs = list(yaml.safe_load_all((GITOPS / "argocd-application.yaml").read_text()))
    app, job = docs
    assert app["kind"] == "Application"
    assert {p["name"] for p in app["spec"]["source"]["helm"]["parameters"]} == {"gitops.enabled", "gitops.gitSha"}
    assert job["metadata"]["annotations"]["argocd.argoproj.io/hook"] == "Sync"
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["kubellm", "submit"]
    args = _parse(c["args"])
    assert args.git_sha == "<SHA>" and args.run_config == "/etc/kubellm/run-config.yaml"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_readme_run_config_example_is_valid_and_names_every_source(tmp_path: Path) -> None:
    from kubellm.runconfig import load_run_config

    text = (GITOPS / "README.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "retrain.yaml").write_text(block)
    cfg = load_run_config(tmp_path / "retrain.yaml")
    assert all(getattr(cfg.sources, k).startswith("s3://") for k in ("raw", "chat", "preferences"))
