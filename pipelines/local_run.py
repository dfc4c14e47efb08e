"""`kubellm run --local`: run a pipeline on this machine through `kfp.local` — no cluster, no Docker.

    kubellm run --local --preset debug                          # demo world -> llm_from_scratch
    kubellm run --local --preset debug --raw ./my-corpus --chat ./chat.jsonl --preferences ./prefs.jsonl
    kubellm run --local --run-config run.yaml --set pretrain.train.max_steps=20 --workdir /tmp/kl
    kubellm run --local --pipeline evaluation_report --models .kubellm/artifacts/dpo/ab12...
    # artifacts in a local S3 (MinIO, moto): credentials from AWS_* as usual
    kubellm run --local --preset debug --s3-endpoint http://127.0.0.1:9000 --bucket kubellm

How it runs: `kfp.local.init(runner=SubprocessRunner(use_venv=False))` executes every lightweight
component as a subprocess of this Python (kubellm is importable; no venv is built, nothing is pip
installed) and passes artifacts as files under `<workdir>/kfp` (KFP local's pipeline_root, always
local). The stages themselves publish their data under the storage root: `<workdir>/artifacts` or,
with `--bucket`, `s3://BUCKET/PREFIX`. kfp.local runs whole pipelines (sequentially, in dependency
order); it has no cache, so every step runs every time — the stages' content-addressed prefixes make
a re-run with unchanged inputs cheap where the stage checks for an existing manifest.

Without `--raw`, the deterministic demo world (`kubellm demo-world`) is generated into
`<workdir>/demo-world` first and its corpus, chat and preference files are used.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, TextIO

from kubellm.core.errors import ConfigError, KubellmError
from kubellm.core.storage import (
    check_output_dir,
    endpoint_problem,
    is_s3,
    join,
    redact,
    reset_clients,
    storage_for,
)
from kubellm.pipelines.common import add_config_args, load_config, parse_params
from kubellm.pipelines.definitions import (
    PIPELINES,
    SOURCE_PARAMS,
    PipelineSettings,
    build_pipelines,
    check_arguments,
    parameter_defaults,
)
from kubellm.pipelines.runtime import HEADLINE
from kubellm.runconfig import load_run_config

log = logging.getLogger(__name__)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def configure(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--local", action="store_true", required=True,
                   help="run through kfp.local on this machine (for a cluster use `kubellm submit`)")
    p.add_argument("--pipeline", choices=PIPELINES, default="llm_from_scratch")
    add_config_args(p)
    p.add_argument("--workdir", default=".kubellm/local",
                   help="local directory for KFP's task outputs, the demo world and (without --bucket) artifacts")
    p.add_argument("--raw", help="raw corpus: local path/glob or s3:// prefix (default: the run-config's "
                                 "sources.raw, else the demo world's)")
    p.add_argument("--chat", help="SFT chat data (default: sources.chat, else the demo world's)")
    p.add_argument("--preferences", help="DPO preference pairs (default: sources.preferences, else the demo world's)")
    p.add_argument("--models", action="append", default=[],
                   help="evaluation_report: model artifact prefixes (repeatable or comma separated; "
                        "default: the promoted model)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (MinIO, moto) for the artifacts")
    p.add_argument("--bucket", help="bucket for the artifacts (with --s3-endpoint, or AWS S3 without it)")
    p.add_argument("--prefix", default="kubellm", help="key prefix inside --bucket")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="set any pipeline parameter for this run")
    p.add_argument("--until", choices=["data_prep", "tokenizer", "pretrain", "sft", "dpo"],
                   help="llm_from_scratch: stop after this stage (iterate on data without training)")
    p.add_argument("--demo-scale", type=float, default=1.0, help="size of the generated demo world")


class _HeadlineTee(io.TextIOBase):
    """Passes everything through to the real stream and remembers the `[kubellm]` lines the
    components print (kfp.local relays the subprocesses' output with print())."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lines: list[str] = []
        self._buf = ""

    def write(self, s: str) -> int:
        self.stream.write(s)
        self._buf += s
        *done, self._buf = self._buf.split("\n")
        self.lines += [ln.strip() for ln in done if ln.lstrip().startswith(HEADLINE)]
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def _setup_s3(args: argparse.Namespace) -> str:
    """Point kubellm (and the subprocesses, via env) at the S3 endpoint; make sure the bucket exists.

    A missing bucket is created in the configured region (AWS_REGION; outside us-east-1 S3 needs it
    as the LocationConstraint). Failures are KubellmErrors naming the bucket and the endpoint, with
    any credentials in the endpoint URL redacted."""
    from kubellm.core.storage import redact, s3_client

    if args.s3_endpoint:
        os.environ["KUBELLM_S3_ENDPOINT_URL"] = args.s3_endpoint
        reset_clients()
    client = s3_client()
    where = redact(args.s3_endpoint or client.meta.endpoint_url)  # the endpoint actually used
    try:
        client.head_bucket(Bucket=args.bucket)
    except Exception as e:  # noqa: BLE001 - botocore raises several types here
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise KubellmError(redact(f"S3 bucket {args.bucket!r} at {where}: {e}")) from e
        region = client.meta.region_name or "us-east-1"
        print(f"{HEADLINE} creating bucket s3://{args.bucket} (region {region})")
        kwargs: dict[str, Any] = {"Bucket": args.bucket}
        if region != "us-east-1":  # us-east-1 is the one region S3 refuses as a LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            client.create_bucket(**kwargs)
        except Exception as e:  # noqa: BLE001 - ClientError, ParamValidationError, connection errors
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            if code not in ("BucketAlreadyOwnedByYou",):  # created meanwhile by another run of ours
                raise KubellmError(redact(
                    f"S3 bucket {args.bucket!r} at {where}: could not create it in region {region}: {e}"
                )) from e
    return join(f"s3://{args.bucket}", args.prefix)


DEMO_SETTINGS = "demo-world.settings.json"  # beside demo-world/ (a foreign file inside it is refused)


def _demo_world(workdir: Path, root: str, scale: float, seed: int = 0) -> dict[str, str]:
    """Generate the demo world once per workdir and (seed, scale) — regenerated when either differs
    from what the existing one was generated with (world.json records the seed, `DEMO_SETTINGS` the
    scale); with an S3 root, also upload it there so the stages read their sources through S3 like on
    a cluster: objects whose content differs are replaced and objects the world no longer has removed."""
    import json

    from kubellm.data_prep.demo_world import generate

    out = workdir / "demo-world"
    want = {"seed": seed, "scale": float(scale)}
    settings = workdir / DEMO_SETTINGS
    have: dict[str, Any] | None = None
    try:
        have = {"seed": json.loads((out / "world.json").read_text())["seed"],
                "scale": float(json.loads(settings.read_text())["scale"])}
    except (OSError, ValueError, KeyError, TypeError):
        have = None  # no world, or one of unknown settings: regenerate
    if have != want:
        why = "" if not (out / "world.json").is_file() else (
            f" (replacing the one generated with seed {have['seed']}, scale {have['scale']:g})" if have
            else " (replacing one of unknown scale)")
        print(f"{HEADLINE} generating the demo world (seed {seed}, scale {scale:g}) in {out}{why}")
        settings.unlink(missing_ok=True)
        generate(out, seed=seed, scale=scale)
        settings.write_text(json.dumps(want))
    src = {"raw": str(out / "corpus"), "chat": str(out / "chat" / "train.jsonl"),
           "preferences": str(out / "preferences" / "train.jsonl")}
    if is_s3(root):
        dest = join(root, "demo-world")
        _sync_up(out, dest)
        src = {"raw": join(dest, "corpus"), "chat": join(dest, "chat", "train.jsonl"),
               "preferences": join(dest, "preferences", "train.jsonl")}
    return src


def _s3_etag(path: Path, threshold: int, chunksize: int) -> str:
    """The ETag S3 gives `path` as kubellm's storage uploads it: the MD5 of its bytes, or from the
    multipart threshold on the MD5 of its parts' MD5s and the part count (`<hex>-<n>`). Read in chunks."""
    import hashlib

    multipart = path.stat().st_size >= threshold
    whole, parts = hashlib.md5(), []
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunksize if multipart else 8 << 20), b""):
            if multipart:
                parts.append(hashlib.md5(block).digest())
            else:
                whole.update(block)
    return f"{hashlib.md5(b''.join(parts)).hexdigest()}-{len(parts)}" if multipart else whole.hexdigest()


def _sync_up(local: Path, dest: str) -> None:
    """Make the objects under `dest` the files under `local`: upload a file whose object is missing or
    differs (size, or ETag vs the file's — multipart ones included), delete objects with no file."""
    from kubellm.core.storage import S3Settings

    st = storage_for(dest)
    cfg = S3Settings.from_env() if is_s3(dest) else S3Settings()
    remote = {o.relpath: o for o in st.list(dest)}
    files = {p.relative_to(local).as_posix(): p for p in sorted(local.rglob("*")) if p.is_file()}
    for rel, p in files.items():
        o = remote.get(rel)
        if o is None or o.size != p.stat().st_size or o.etag != _s3_etag(p, cfg.multipart_threshold,
                                                                             cfg.multipart_chunksize):
            st.upload(p, join(dest, rel))
    for rel, o in remote.items():
        if rel not in files:
            st.delete(o.uri)


def pipeline_arguments(args: argparse.Namespace, root: str, workdir: Path, cfg: Any = None) -> dict[str, Any]:
    """The run's arguments. `root` is the storage root this run chose (--bucket, storage.root, the
    workdir); a `--param storage_root` replaces it, and the promoted pointer and an S3 copy of the demo
    world follow the root actually used."""
    from kubellm.pipelines.fingerprint import default_pointer

    params = param_arguments(args, cfg)
    root = params.get("storage_root", root)
    gate = getattr(getattr(cfg, "evaluate", None), "gate", None)
    # the promoted pointer follows the storage root (unless the gate names a registry)
    arguments: dict[str, Any] = {"storage_root": root, "promoted_pointer": default_pointer(
        root, getattr(gate, "registry", None), getattr(gate, "name", "kubellm"))}
    if args.pipeline == "llm_from_scratch":
        sources = getattr(cfg, "sources", None)
        both = [(k, p) for k, p in SOURCE_PARAMS.items() if getattr(args, k, None) and p in params]
        if both:
            raise ConfigError("; ".join(f"--{k} and --param {p} both name the {k} source" for k, p in both)
                              + ": give one")
        # per source: --raw/--chat/--preferences or --param <source>, else the run-config's, else the demo world's
        given = {k: getattr(args, k, None) or params.get(p) or getattr(sources, k, "") for k, p in SOURCE_PARAMS.items()}
        src = dict(given)
        missing = [k for k, v in given.items() if not v]
        if missing:
            demo = _demo_world(workdir, root, args.demo_scale)
            src.update({k: demo[k] for k in missing})
            if len(missing) < len(given):
                named = ", ".join(f"--{k} (sources.{k})" for k in missing)
                print(f"{HEADLINE} {named} not given: using the demo world's")
        arguments.update({p: src[k] for k, p in SOURCE_PARAMS.items()})
    else:
        arguments["model_uris"] = [m.strip() for item in args.models for m in item.split(",") if m.strip()]
    arguments.update(params)
    return arguments


def param_arguments(args: argparse.Namespace, cfg: Any = None) -> dict[str, Any]:
    """The --param values, each checked against this pipeline's parameters (name and type)."""
    defaults = parameter_defaults(cfg if cfg is not None else load_run_config(preset="debug"),
                                  PipelineSettings())[args.pipeline]
    return check_arguments(args.pipeline, parse_params(args.param), defaults)


def run_local(args: argparse.Namespace) -> tuple[bool, list[str]]:
    """Run the pipeline; returns (succeeded, the components' headline lines)."""
    from kfp import local

    from kubellm.data_prep.demo_world import check_scale

    only = {"llm_from_scratch": ("until", "raw", "chat", "preferences"), "evaluation_report": ("models",)}
    for pipeline, flags in only.items():
        given = [f"--{f}" for f in flags if getattr(args, f, None)]
        if given and args.pipeline != pipeline:
            raise ConfigError(f"{', '.join(given)}: only for --pipeline {pipeline} (this run is {args.pipeline})")
    cfg = load_config(args)
    param_arguments(args, cfg)  # refused before anything is written
    workdir = Path(args.workdir).resolve()
    check_output_dir(workdir, "--workdir")
    try:
        check_scale(args.demo_scale)
    except ConfigError as e:
        raise ConfigError(f"--demo-scale: {e}") from None
    if args.s3_endpoint and not args.bucket:
        raise ConfigError("--s3-endpoint needs --bucket (the bucket the artifacts go to)")
    if args.s3_endpoint and (problem := endpoint_problem(args.s3_endpoint)):
        raise ConfigError(f"--s3-endpoint {redact(args.s3_endpoint)!r}: {problem}")  # before the workdir is made
    if args.bucket and "storage_root" in parse_params(args.param):
        raise ConfigError("--param storage_root and --bucket both choose where the artifacts go: give one")
    workdir.mkdir(parents=True, exist_ok=True)
    if args.bucket:
        root = _setup_s3(args)
    elif args.s3_endpoint:
        raise ConfigError("--s3-endpoint needs --bucket (the bucket the artifacts go to)")
    else:
        root = cfg.storage.root if is_s3(cfg.storage.root) else str(workdir / "artifacts")
        if (not is_s3(cfg.storage.root) and cfg.storage.root != type(cfg.storage)().root
                and "storage_root" not in parse_params(args.param)):
            log.warning("storage.root=%s is a local directory: a local run keeps its artifacts under --workdir "
                        "(%s); use --param storage_root=%s to publish there", cfg.storage.root, root,
                        cfg.storage.root)
    arguments = pipeline_arguments(args, root, workdir, cfg)
    root = arguments["storage_root"]  # a --param storage_root included
    # kfp.local 2.16.1 cannot run a step after a dsl.ParallelFor: data prep runs as one step here (the
    # same artifact as the fan-out; data_prep.fan_out only shapes compiled/submitted pipelines).
    pipeline = build_pipelines(cfg, PipelineSettings(data_prep_parallelism=1), until=args.until)[args.pipeline]
    print(f"{HEADLINE} running {args.pipeline} locally: artifacts in {root}, KFP outputs in {workdir / 'kfp'}")

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp"),
               raise_on_error=True)
    tee = _HeadlineTee(sys.stdout)
    earlier = set((workdir / "kfp").glob("*"))  # earlier runs' outputs: never this run's report
    with warnings.catch_warnings():
        # kfp.local warns when an image name lacks "python"; ours run in this interpreter, not the image.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="kfp.local")
        old, sys.stdout = sys.stdout, tee  # type: ignore[assignment]
        try:
            pipeline(**arguments)
            error = ""
        except RuntimeError as e:
            # kfp.local: "Pipeline X finished with status FAILURE. Inner task failed: <task>."
            if "finished with status" not in str(e):
                raise
            error = _ANSI.sub("", str(e))
        finally:
            sys.stdout = old
    if error:
        # a failed gate fails the run after evaluate published its report: show its scores too
        tee.lines += _report_lines(workdir / "kfp", args.pipeline, earlier)
        tee.lines.append(f"{HEADLINE} {error}")
    else:
        tee.lines += _report_lines(workdir / "kfp", args.pipeline, earlier)
        if args.pipeline == "llm_from_scratch" and not args.until:
            tee.lines += _answers_side_by_side(workdir / "kfp", workdir / "demo-world" / "eval" / "format.jsonl")
    return not error, tee.lines


# (task dir, output artifact file) of each model the pipeline trains, in pipeline order
_MODEL_OUTPUTS = (("base", "pretrain", "model"), ("sft", "sft", "sft_model"), ("dpo", "dpo", "dpo_model"))


def _answers_side_by_side(kfp_root: Path, questions_file: Path, n: int = 4) -> list[str]:
    """Greedy answers of the base, SFT and DPO models to a few held-out demo-world questions."""
    import json

    from kubellm.core.manifest import load_manifest_ref
    from kubellm.model.generate import chat, load_for_generation

    runs = sorted(kfp_root.glob("llm-from-scratch-*"))
    if not runs or not questions_file.is_file():
        return []
    items = [json.loads(ln) for ln in questions_file.read_text().splitlines()[:n] if ln.strip()]
    columns = []
    for label, task, output in _MODEL_OUTPUTS:
        ref = runs[-1] / task / output
        if not ref.is_file():
            continue
        bundle = load_for_generation(load_manifest_ref(str(ref)).uri)
        columns.append((label, [chat(bundle, it["messages"], max_new_tokens=12).strip().replace("\n", " ")
                                for it in items]))
    if not columns:
        return []
    lines = ["", f"{HEADLINE} held-out questions, greedy answers side by side:",
             "| question | expected | " + " | ".join(c[0] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for i, it in enumerate(items):
        q = it["messages"][-1]["content"]
        lines.append(f"| {q} | {it['answer']} | " + " | ".join(c[1][i] or "∅" for c in columns) + " |")
    return lines


def _report_lines(kfp_root: Path, pipeline: str, earlier: set[Path] | frozenset[Path] = frozenset()) -> list[str]:
    """The evaluation's score table and where its reports are, from this run's KFP outputs (the newest
    run directory not in `earlier`; none when this run did not get to publish a report)."""
    from kubellm.pipelines.definitions import PIPELINE_NAMES

    runs = sorted(r for r in kfp_root.glob(f"{PIPELINE_NAMES[pipeline]}-*") if r not in earlier)
    if not runs:
        return []
    task = "evaluate" if pipeline == "llm_from_scratch" else "evaluate-models"
    md, html = runs[-1] / task / "report", runs[-1] / task / "report_html"
    if not md.is_file():
        return []
    text = md.read_text()
    table = [ln for ln in text.splitlines() if ln.startswith("|") or ln.startswith("## Gate")]
    return ["", *table, "", f"{HEADLINE} report (Markdown): {md}", f"{HEADLINE} report (HTML): {html}"]


def main(args: argparse.Namespace) -> int:
    ok, lines = run_local(args)
    print("\n" + "=" * 72)
    print(f"kubellm run --local --pipeline {args.pipeline}: {'SUCCEEDED' if ok else 'FAILED'}")
    for ln in lines:
        print(ln)
    return 0 if ok else 1
