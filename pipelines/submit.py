"""`kubellm submit`: send a pipeline run to a Kubeflow Pipelines endpoint and print its URL.

    export KUBELLM_KFP_TOKEN=...            # multi-user Kubeflow (or KUBELLM_KFP_COOKIE); never a flag
    kubellm submit --endpoint https://kubeflow.example.com/pipeline --namespace team-ml \
        --run-config configs/prod.yaml --pipeline-root s3://ml-bucket/kfp --service-account default-editor \
        --registry registry.example.com/ml --tag 1a2b3c --wait
    # GitOps: exactly one run per commit (a second call finds the run and prints it)
    kubellm submit --run-config configs/prod.yaml --git-sha "$GITHUB_SHA" --upload

The pipeline is compiled from the run-config right here (its values become the parameter defaults,
so the run shows them in the UI); `--param NAME=VALUE` changes a parameter's compiled default (in the
uploaded pipeline too), `--arg NAME=VALUE` sets it for this run only. A `<stage>_config` given as a
JSON object is merged over the run-config's section.
`--upload` also registers the compiled pipeline as a version of a named pipeline in the UI (version
name: the git sha, else a content hash); re-uploading identical content reuses the version, different
content under the same version name is a conflict and is refused. With --namespace the pipeline lives in
that profile namespace (looked up and created there), else it is a shared pipeline.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from kubellm.core.errors import ConfigError
from kubellm.pipelines.common import (
    add_config_args,
    add_image_args,
    check_cluster_paths,
    compile_pipelines,
    load_config,
    parse_params,
    settings_from_args,
)
from kubellm.pipelines.definitions import (
    PIPELINE_NAMES,
    PIPELINES,
    SOURCE_PARAMS,
    check_arguments,
    parameter_defaults,
)
from kubellm.pipelines.kfp_api import (
    FAILED_STATES,
    FINAL_STATES,
    KfpApiError,
    api_errors,
    connect,
    eq_filter,
    run_url,
)

_SHA = re.compile(r"^[0-9a-f]{7,64}$")


def add_endpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", help="KFP API/UI URL, e.g. https://kubeflow.example.com/pipeline "
                                      "(default: $KUBELLM_KFP_ENDPOINT)")
    p.add_argument("--namespace", help="profile namespace (multi-user Kubeflow)")
    p.add_argument("--experiment", default="kubellm", help="experiment the run belongs to (created if absent)")
    p.add_argument("--pipeline-root", help="where KFP stores this run's artifacts, e.g. s3://bucket/kfp")
    p.add_argument("--service-account", help="Kubernetes ServiceAccount the run's pods use "
                                              "(pipeline-runner single-user, default-editor multi-user)")


def configure(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--pipeline", choices=PIPELINES, default="llm_from_scratch")
    add_config_args(p)
    add_endpoint_args(p)
    add_image_args(p)
    p.add_argument("--run-name", help="display name of the run (default: <config name>-<pipeline>-<YYYYmmdd-HHMMSS>; "
                   "with --git-sha: <config name>-<pipeline>-<sha12>-<content hash 8>, and --run-name is ignored)")
    p.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE", dest="args",
                   help="a pipeline argument for this run only (the compiled defaults stay)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--no-cache", dest="cache", action="store_false",
                       help="disable KFP caching for every step of this run (re-run everything)")
    cache.add_argument("--cache", dest="cache", action="store_true",
                       help="compile-time caching (default): stages cached, fingerprint steps never")
    p.set_defaults(cache=True)
    p.add_argument("--git-sha", help="GitOps: the commit being deployed; the run name derives from it and a "
                                     "second submit for the same commit finds the existing run")
    p.add_argument("--upload", action="store_true", help="register the compiled pipeline as a version in the UI")
    p.add_argument("--pipeline-name", help="pipeline name in the UI for --upload (default: the pipeline's)")
    p.add_argument("--version-name", help="pipeline version name for --upload (default: <sha12>-<spec hash 8> with "
                                          "--git-sha, else spec-<spec hash 12>)")
    p.add_argument("--wait", action="store_true", help="wait for the run to finish: exit 0 if it succeeded, 1 if it failed or was "
                   "cancelled, 2 if --timeout passed first")
    p.add_argument("--timeout", type=float, default=7 * 24 * 3600, help="--wait limit in seconds")
    p.add_argument("--poll-interval", type=float, default=15.0, help="--wait polling interval in seconds")


def disable_caching(doc: dict[str, Any]) -> None:
    """Every task of the pipeline spec (root and nested DAGs) uncached — what `--no-cache` means."""
    dags = [doc["root"]] + list(doc.get("components", {}).values())
    for comp in dags:
        for task in comp.get("dag", {}).get("tasks", {}).values():
            task["cachingOptions"] = {"enableCache": False}


def compile_for_submit(args: argparse.Namespace, out_dir: Path) -> tuple[Path, str, Any]:
    """Compile the chosen pipeline (caching applied); returns (path, content hash, run-config)."""
    cfg = load_config(args)
    path = compile_pipelines(cfg, settings_from_args(args), out_dir, (args.pipeline,))[args.pipeline]
    if not args.cache:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        disable_caching(docs[0])
        path.write_text(yaml.safe_dump_all(docs, sort_keys=True))
    spec = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in spec:
        d.pop("sdkVersion", None)
    digest = hashlib.sha256(yaml.safe_dump_all(spec, sort_keys=True).encode()).hexdigest()
    return path, digest, cfg


def check_sources(pipeline: str, arguments: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse, before anything reaches the cluster, an llm_from_scratch run with no data to read: its
    first step would fail on an empty source (a GitOps merge has nobody to type it into the UI)."""
    if pipeline != "llm_from_scratch":
        return
    missing = [(k, p) for k, p in SOURCE_PARAMS.items() if not str(arguments.get(p) or defaults[p]).strip()]
    if missing:
        how = "; ".join(f"{p}: set sources.{k} in the run-config, or --param {p}=s3://…" for k, p in missing)
        raise ConfigError(f"llm_from_scratch needs its input data, and these are empty — {how}")


def gitops_run_name(config_name: str, pipeline: str, sha: str, content: str) -> str:
    """`<config name>-<pipeline>-<sha12>-<content8>`: one run per commit *and* submitted content
    (`submission_hash`), so two run-configs deployed from one commit (two chart releases, a CI
    matrix) that share a name, or the default one, each get their run instead of the second
    finding the first's and submitting nothing."""
    sha = sha.strip().lower()
    if not _SHA.match(sha):
        raise ConfigError(f"--git-sha {sha!r}: expected a hex commit id (7-64 characters)")
    return f"{config_name}-{PIPELINE_NAMES[pipeline]}-{sha[:12]}-{content[:8]}"


def submission_hash(spec_digest: str, arguments: dict[str, Any]) -> str:
    """sha256 of what a run executes: the compiled spec (with the run-config's parameter defaults) and
    the run's own `--arg` values."""
    args = yaml.safe_dump(arguments, sort_keys=True)
    return hashlib.sha256(f"{spec_digest}\n{args}".encode()).hexdigest()


def find_run(client: Any, experiment_id: str, name: str) -> Any | None:
    """The run named `name` in the experiment (the newest if several), or None."""
    with api_errors(f"list runs named {name!r}"):
        resp = client.list_runs(experiment_id=experiment_id, filter=eq_filter("display_name", name),
                                page_size=100, sort_by="created_at desc")
    runs = [r for r in (resp.runs or []) if r.display_name == name]
    return runs[0] if runs else None


def find_pipeline(client: Any, name: str, namespace: str | None) -> str | None:
    """The id of the pipeline named `name` in `namespace` (multi-user: a profile namespace), or among the
    shared pipelines when no namespace is given; None if there is none. (`kfp.Client.get_pipeline_id` lists
    without a namespace, which in multi-user KFP sees only shared pipelines, never the profile's own.)"""
    page_token = ""
    with api_errors(f"look up pipeline {name!r}" + (f" in namespace {namespace!r}" if namespace else "")):
        while True:
            resp = client.list_pipelines(page_token=page_token, page_size=100, namespace=namespace or None,
                                         filter=eq_filter("display_name", name))
            hits = [p for p in (resp.pipelines or []) if p.display_name == name]
            if hits:
                return hits[0].pipeline_id
            page_token = resp.next_page_token or ""
            if not page_token:
                return None


def ensure_version(client: Any, path: Path, pipeline_name: str, version_name: str, digest: str,
                   namespace: str | None) -> tuple[str, str]:
    """(pipeline_id, version_id) of `version_name` holding exactly this content; uploads it if absent.
    The pipeline is looked up, and created if absent, in `namespace` (shared when None)."""
    description = f"kubellm spec sha256:{digest}"
    pid = find_pipeline(client, pipeline_name, namespace)
    if pid is None:
        try:
            with api_errors(f"upload pipeline {pipeline_name!r}"):
                pid = client.upload_pipeline(str(path), pipeline_name=pipeline_name, namespace=namespace,
                                             description="kubellm pipeline (versions uploaded by kubellm submit)"
                                             ).pipeline_id
        except KfpApiError:
            # 409 (or 500 "already exists" on older KFP): it exists after all — another submit created it
            # meanwhile, or the server keeps it where the lookup did not see it. Use that one.
            pid = find_pipeline(client, pipeline_name, namespace)
            if pid is None and namespace:
                pid = find_pipeline(client, pipeline_name, None)
            if pid is None:
                raise
    try:
        with api_errors(f"upload version {version_name!r} of pipeline {pipeline_name!r}"):
            v = client.upload_pipeline_version(str(path), version_name, pipeline_id=pid, description=description)
        return pid, v.pipeline_version_id
    except KfpApiError:
        # KFP answers 409 (newer) or 500 "already exists" (older) for a taken version name: look it up.
        with api_errors(f"list versions of pipeline {pipeline_name!r}"):
            resp = client.list_pipeline_versions(pid, filter=eq_filter("display_name", version_name), page_size=100)
        same = [v for v in (resp.pipeline_versions or []) if v.display_name == version_name]
        if not same:
            raise
        if (same[0].description or "") != description:
            raise KfpApiError(
                f"pipeline version conflict: {pipeline_name!r} already has a version {version_name!r} with "
                f"different content ({same[0].description or 'no kubellm hash'}; this one is sha256:{digest[:12]}…). "
                "Pick another --version-name, or submit without --upload") from None
        print(f"pipeline version {pipeline_name}/{version_name} already uploaded with this content; reusing it")
        return pid, same[0].pipeline_version_id


def wait_for(client: Any, endpoint: str, run_id: str, timeout: float, poll: float) -> int:
    """Poll until the run ends; print state changes; 0 when it succeeded."""
    start, last = time.monotonic(), None
    while True:
        with api_errors(f"get run {run_id}"):
            run = client.get_run(run_id)
        state = str(run.state or "PENDING")
        if state != last:
            print(f"run {run_id}: {state}", flush=True)
            last = state
        if state in FINAL_STATES:
            if state == "SUCCEEDED":
                return 0
            msg = getattr(run.error, "message", None) if run.error else None
            print(f"run {run_id} {state.lower()}{': ' + msg if msg else ''} — {run_url(endpoint, run_id)}")
            return 1
        if time.monotonic() - start > timeout:
            print(f"run {run_id}: still {state} after {timeout:.0f}s; stopped waiting — {run_url(endpoint, run_id)}")
            return 2
        time.sleep(poll)


def main(args: argparse.Namespace) -> int:
    arguments = parse_params(args.args, "--arg")
    with tempfile.TemporaryDirectory(prefix="kubellm-submit-") as tmp:
        path, digest, cfg = compile_for_submit(args, Path(tmp))
        defaults = parameter_defaults(cfg, settings_from_args(args))[args.pipeline]
        arguments = check_arguments(args.pipeline, arguments, defaults, "--arg")
        check_sources(args.pipeline, arguments, defaults)
        check_cluster_paths(args.pipeline, arguments, defaults)
        content = submission_hash(digest, arguments)
        run_name = (gitops_run_name(cfg.name, args.pipeline, args.git_sha, content) if args.git_sha
                    else args.run_name or f"{cfg.name}-{PIPELINE_NAMES[args.pipeline]}-{time.strftime('%Y%m%d-%H%M%S')}")
        client = connect(args.endpoint, args.namespace)
        endpoint = client._existing_config.host
        with api_errors(f"get or create experiment {args.experiment!r}"):
            exp = client.create_experiment(args.experiment, namespace=args.namespace)
        if args.git_sha:
            existing = find_run(client, exp.experiment_id, run_name)
            if existing is not None:
                print(f"commit {args.git_sha[:12]} already has run {existing.run_id} ({existing.state}): "
                      f"{run_url(endpoint, existing.run_id)}")
                if args.wait:
                    return wait_for(client, endpoint, existing.run_id, args.timeout, args.poll_interval)
                if str(existing.state) in FAILED_STATES:  # a green CI job would hide that nothing trained
                    print(f"run {existing.run_id} did not succeed ({existing.state}): retry it in the KFP UI "
                          "(Retry), or change the run-config in a new commit for a new run", file=sys.stderr)
                    return 1
                return 0
        common = dict(experiment_id=exp.experiment_id, job_name=run_name, params=arguments,
                      pipeline_root=args.pipeline_root, service_account=args.service_account)
        if args.upload:
            version = args.version_name or (f"{args.git_sha.strip().lower()[:12]}-{digest[:8]}" if args.git_sha
                                            else f"spec-{digest[:12]}")
            pid, vid = ensure_version(client, path, args.pipeline_name or PIPELINE_NAMES[args.pipeline],
                                      version, digest, args.namespace)
            with api_errors(f"create run {run_name!r}"):
                run = client.run_pipeline(pipeline_id=pid, version_id=vid, **common)
        else:
            with api_errors(f"create run {run_name!r}"):
                run = client.run_pipeline(pipeline_package_path=str(path), **common)
    print(f"submitted run {run.run_id} ({run_name}): {run_url(endpoint, run.run_id)}")
    if args.wait:
        return wait_for(client, endpoint, run.run_id, args.timeout, args.poll_interval)
    return 0
