"""`kubellm schedule`: create or update (idempotently, by name) the recurring `evaluation_report` run.

    kubellm schedule --endpoint https://kubeflow.example.com/pipeline --namespace team-ml \
        --name weekly-eval-report --cron "0 0 6 * * 1" --run-config configs/prod.yaml \
        --pipeline-root s3://ml-bucket/kfp --service-account default-editor

KFP's cron has SIX fields, seconds first (`sec min hour day-of-month month day-of-week`, robfig/cron):
"0 0 6 * * 1" is Mondays 06:00:00. A five-field crontab line is refused with that explanation.

Every scheduled run re-evaluates: caching is off for the whole run. No catch-up (a paused schedule
does not backfill missed reports), `--max-concurrency` (default 1) runs at a time. KFP has no update
call for recurring runs, so "update" is: same name and same desired spec -> nothing to do (printed),
except that one paused in the UI is re-enabled (unless --disabled); anything changed -> a new
recurring run is created, then the old one deleted (a failed create leaves the old one in place).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from kubellm.core.errors import ConfigError
from kubellm.core.manifest import stable_hash
from kubellm.pipelines.common import (
    add_config_args,
    add_image_args,
    check_cluster_paths,
    parse_params,
    settings_from_args,
)
from kubellm.pipelines.definitions import check_arguments, parameter_defaults
from kubellm.pipelines.kfp_api import api_errors, connect, eq_filter
from kubellm.pipelines.submit import add_endpoint_args, compile_for_submit

_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,126}[a-z0-9])?$")
# field name, min, max, names allowed in the field
_CRON_FIELDS = (
    ("second", 0, 59, ()), ("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day-of-month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
    ("day-of-week", 0, 6, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def validate_cron(expr: str) -> str:
    """Check a KFP (robfig/cron, six fields, seconds first) expression; return it normalised."""
    expr = " ".join(expr.split())
    if expr in _DESCRIPTORS or re.fullmatch(r"@every \d+(ns|us|ms|s|m|h)(\d+(ns|us|ms|s|m|h))*", expr):
        return expr
    fields = expr.split(" ")
    if len(fields) == 5:
        raise ConfigError(
            f"--cron {expr!r} has 5 fields, but KFP's cron has SIX, seconds first: "
            f"'sec min hour day-of-month month day-of-week'; for this schedule use '0 {expr}'")
    if len(fields) != 6:
        raise ConfigError(f"--cron {expr!r} has {len(fields)} fields; KFP's cron has six, seconds first: "
                          "'sec min hour day-of-month month day-of-week', e.g. '0 0 6 * * 1' (Mondays 06:00)")
    for text, (name, lo, hi, names) in zip(fields, _CRON_FIELDS, strict=True):
        for part in text.split(","):
            _check_part(part, name, lo, hi, names, expr)
    return expr


def _check_part(part: str, name: str, lo: int, hi: int, names: tuple[str, ...], expr: str) -> None:
    def value(tok: str) -> int:
        t = tok.lower()
        if t in names:
            return names.index(t) + lo
        if not t.isdigit():
            raise ConfigError(f"--cron {expr!r}: {name} field has {tok!r}; expected a number {lo}-{hi}"
                              + (f" or one of {', '.join(names)}" if names else ""))
        v = int(t)
        if not lo <= v <= hi:
            raise ConfigError(f"--cron {expr!r}: {name} {v} out of range {lo}-{hi}")
        return v

    rng, _, step = part.partition("/")
    if step and (not step.isdigit() or int(step) == 0):
        raise ConfigError(f"--cron {expr!r}: {name} step {step!r} must be a positive number")
    if rng in ("*", "?"):
        if rng == "?" and name not in ("day-of-month", "day-of-week"):
            raise ConfigError(f"--cron {expr!r}: '?' is only allowed in day-of-month or day-of-week")
        return
    a, dash, b = rng.partition("-")
    if dash and not b:
        raise ConfigError(f"--cron {expr!r}: {name} range {rng!r} has no end")
    start = value(a)
    if b and value(b) < start:
        raise ConfigError(f"--cron {expr!r}: {name} range {rng!r} runs backwards")


def configure(p: argparse.ArgumentParser, command: str) -> None:
    add_config_args(p)
    add_endpoint_args(p)
    add_image_args(p)
    p.add_argument("--name", required=True, help="recurring run name (unique in the experiment; DNS-style)")
    p.add_argument("--cron",
                   help="KFP cron, SIX fields with seconds first, e.g. '0 0 6 * * 1' (Mondays 06:00:00); required "
                        "unless --delete")
    p.add_argument("--max-concurrency", type=int, default=1, help="report runs allowed at once (1-10)")
    p.add_argument("--models", action="append", default=[],
                   help="model artifact prefixes to report on (repeatable; default: the promoted model)")
    p.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE", dest="args",
                   help="a pipeline argument for every scheduled run")
    p.add_argument("--disabled", action="store_true", help="create/update it paused")
    p.add_argument("--delete", action="store_true",
                   help="delete the recurring run(s) named --name in --experiment instead (nothing else; no-op when "
                        "there is none). The Helm chart runs this on `helm uninstall`")
    p.set_defaults(pipeline="evaluation_report", cache=False)


def desired_hash(spec_digest: str, args: argparse.Namespace, cron: str, arguments: dict[str, Any]) -> str:
    return stable_hash({"spec": spec_digest, "cron": cron, "max_concurrency": args.max_concurrency,
                        "args": arguments, "pipeline_root": args.pipeline_root,
                        "service_account": args.service_account, "enabled": not args.disabled})


def _is_enabled(rr: Any) -> bool:
    """Whether a recurring run is scheduling: its `mode` (ENABLE/DISABLE, what enable/disable set), or
    where the server leaves that out, its `status` (ENABLED/DISABLED)."""
    mode = str(getattr(rr, "mode", None) or "").upper()
    if mode in ("ENABLE", "DISABLE"):
        return mode == "ENABLE"
    return str(getattr(rr, "status", None) or "").upper() != "DISABLED"


def _state_note(client: Any, rr: Any, *, enabled: bool) -> str:
    """Bring an up-to-date recurring run to the requested state when it was paused (or resumed) in the
    UI — its description hash cannot tell — and say so (empty when nothing changed)."""
    if _is_enabled(rr) == enabled:
        return ""
    if enabled:
        with api_errors(f"enable recurring run {rr.recurring_run_id}"):
            client.enable_recurring_run(rr.recurring_run_id)
        return "; it was disabled (paused in the UI?), re-enabled it"
    with api_errors(f"disable recurring run {rr.recurring_run_id}"):
        client.disable_recurring_run(rr.recurring_run_id)
    return "; it was enabled, disabled it as --disabled asks"


def _recurring_runs_named(client: Any, experiment_id: str, name: str) -> list[Any]:
    """The experiment's recurring runs whose display name is `name` (KFP does not make names unique)."""
    with api_errors(f"list recurring runs named {name!r}"):
        resp = client.list_recurring_runs(experiment_id=experiment_id, filter=eq_filter("display_name", name),
                                          page_size=100)
    return [r for r in (resp.recurring_runs or []) if r.display_name == name]


def delete(args: argparse.Namespace) -> int:
    """Remove the recurring runs named `args.name` in the experiment (what `helm uninstall` leaves behind
    otherwise: KFP would go on firing the scheduled report)."""
    client = connect(args.endpoint, args.namespace)
    with api_errors(f"look up experiment {args.experiment!r}"):
        resp = client.list_experiments(filter=eq_filter("display_name", args.experiment), page_size=100,
                                       namespace=args.namespace)
    exps = [e for e in (resp.experiments or []) if e.display_name == args.experiment]
    found = [rr for exp in exps for rr in _recurring_runs_named(client, exp.experiment_id, args.name)]
    for rr in found:
        with api_errors(f"delete recurring run {rr.recurring_run_id}"):
            client.delete_recurring_run(rr.recurring_run_id)
        print(f"deleted recurring run {args.name} ({rr.recurring_run_id})")
    if not found:
        print(f"no recurring run named {args.name} in experiment {args.experiment!r}: nothing to delete")
    return 0


def main(args: argparse.Namespace) -> int:
    if not _NAME.match(args.name):
        raise ConfigError(f"--name {args.name!r}: expected lower-case letters, digits, '-' or '.', "
                          "starting and ending with a letter or digit")
    if args.delete:
        return delete(args)
    if not args.cron:
        raise ConfigError("--cron is required (unless --delete)")
    cron = validate_cron(args.cron)
    if not 1 <= args.max_concurrency <= 10:
        raise ConfigError(f"--max-concurrency {args.max_concurrency}: KFP allows 1-10")
    arguments = parse_params(args.args, "--arg")
    models = [m.strip() for item in args.models for m in item.split(",") if m.strip()]
    if models:
        arguments["model_uris"] = models
    with tempfile.TemporaryDirectory(prefix="kubellm-schedule-") as tmp:
        path, digest, cfg = compile_for_submit(args, Path(tmp))  # caching off for every step
        defaults = parameter_defaults(cfg, settings_from_args(args))[args.pipeline]
        arguments = check_arguments(args.pipeline, arguments, defaults, "--arg")
        check_cluster_paths(args.pipeline, arguments, defaults)
        want = desired_hash(digest, args, cron, arguments)
        description = f"kubellm evaluation report; kubellm-schedule sha256:{want}"
        client = connect(args.endpoint, args.namespace)
        with api_errors(f"get or create experiment {args.experiment!r}"):
            exp = client.create_experiment(args.experiment, namespace=args.namespace)
        existing = _recurring_runs_named(client, exp.experiment_id, args.name)
        if len(existing) == 1 and (existing[0].description or "") == description:
            old = existing[0]
            state = _state_note(client, old, enabled=not args.disabled)
            print(f"recurring run {args.name} ({old.recurring_run_id}) is up to date: cron {cron!r}{state}")
            return 0
        # create the new one first: if that fails, the old schedule is still there (KFP does not make
        # recurring-run display names unique, so both may exist for a moment)
        with api_errors(f"create recurring run {args.name!r}"):
            rr = client.create_recurring_run(
                experiment_id=exp.experiment_id, job_name=args.name, description=description,
                cron_expression=cron, max_concurrency=args.max_concurrency, no_catchup=True,
                params=arguments, pipeline_package_path=str(path), enabled=not args.disabled,
                pipeline_root=args.pipeline_root, service_account=args.service_account)
        for old in existing:
            with api_errors(f"delete the replaced recurring run {old.recurring_run_id} (the new one, "
                            f"{rr.recurring_run_id}, exists: delete the old one in the UI)"):
                client.delete_recurring_run(old.recurring_run_id)
            print(f"replaced recurring run {args.name} ({old.recurring_run_id})")
    verb = "updated" if existing else "created"
    print(f"{verb} recurring run {args.name} ({rr.recurring_run_id}): cron {cron!r}, max concurrency "
          f"{args.max_concurrency}, no catch-up, caching off{' (disabled)' if args.disabled else ''}; "
          f"models: {json.dumps(models) if models else 'the promoted model'}")
    return 0
