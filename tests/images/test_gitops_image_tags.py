"""The GitOps examples run images by the tag they were built with, not by the config commit's SHA.

Images are tagged when built (images/build.sh, `KUBELLM_TAG=$(git rev-parse --short HEAD)` of the code
commit); a commit that only changes the run config builds none, so its SHA names no image.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

GITOPS = Path(__file__).resolve().parents[2] / "pipelines" / "gitops"


def test_ci_workflow_takes_the_image_tag_from_its_own_setting() -> None:
    wf = yaml.safe_load((GITOPS / "github-actions-retrain.yaml").read_text())
    job = wf["jobs"]["submit"]
    submit = next(s for s in job["steps"] if "kubellm submit" in s.get("run", ""))
    env = {**job.get("env", {}), **submit.get("env", {})}
    tag = env["KUBELLM_TAG"]
    assert "github.sha" not in tag and "github.event" not in tag, f"KUBELLM_TAG: {tag} is the config commit"
    used = set(re.findall(r"\b(inputs\.\w+|vars\.\w+)", tag))
    assert used, f"KUBELLM_TAG: {tag} reads no input or repository variable"
    declared = wf[True]["workflow_dispatch"]["inputs"]  # YAML 1.1 reads the key `on` as True
    for ref in used:
        if ref.startswith("inputs."):
            assert ref.split(".", 1)[1] in declared
    # an unset tag fails the job before anything is submitted (image_for would fall back to the
    # package version, which need not exist in the registry)
    before = job["steps"][: job["steps"].index(submit)]
    assert any("KUBELLM_TAG" in s.get("run", "") and "exit 1" in s.get("run", "") for s in before)
    header = (GITOPS / "github-actions-retrain.yaml").read_text().split("\nname:", 1)[0]
    assert "rev-parse --short HEAD" in header and "KUBELLM_IMAGE_TAG" in header


def test_argocd_examples_do_not_tag_images_with_the_commit() -> None:
    text = (GITOPS / "argocd-application.yaml").read_text()
    app, job = list(yaml.safe_load_all(text))
    assert not any(p["name"] == "images.tag" for p in app["spec"]["source"]["helm"]["parameters"])
    (c,) = job["spec"]["template"]["spec"]["containers"]
    sha_placeholder = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--git-sha="))
    image_tag = c["image"].rsplit(":", 1)[1]
    assert image_tag != sha_placeholder, f"image {c['image']} is tagged with the config commit"
