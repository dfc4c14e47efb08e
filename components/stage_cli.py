"""The stage subcommands (`kubellm data-prep|tokenizer|pretrain|sft|dpo|evaluate`).

    kubellm tokenizer --config run.yaml --input dataset=s3://b/kubellm/data_prep/ab12 \
        --output s3://b/kubellm --manifest-out /tmp/outputs/tokens.json

The same command runs in a container (the KFP component calls the same function) and for a person.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from kubellm.core.errors import ConfigError
from kubellm.core.manifest import write_manifest_file
from kubellm.core.storage import check_output_dir, is_s3
from kubellm.runconfig import load_run_config
from kubellm.stages import STAGES, run_stage

BY_COMMAND = {s.command: s for s in STAGES.values()}


def configure(p: argparse.ArgumentParser, command: str) -> None:
    spec = BY_COMMAND[command]
    p.add_argument("--config", help="run-config YAML (default: --preset's values, else the built-in defaults)")
    p.add_argument("--preset", choices=["debug", "seed"], help="start from a shipped preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config value, e.g. --set pretrain.train.max_steps=10")
    names = ", ".join(spec.inputs + spec.optional_inputs)
    p.add_argument("--input", action="append", default=[], metavar="NAME=URI",
                   help=f"an input artifact or source (names: {names}); repeatable")
    p.add_argument("--output", required=True, help="storage root (local dir or s3://bucket/prefix)")
    p.add_argument("--manifest-out", help="also write the output manifest JSON to this local file")


def parse_inputs(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--input {item!r}: expected NAME=URI")
        k, v = item.split("=", 1)
        if k in out:
            out[k] = out[k] + "," + v  # repeated names form a list (e.g. several models)
        else:
            out[k] = v
    return out


def main(args: argparse.Namespace) -> int:
    spec = BY_COMMAND[args.command]
    if not is_s3(args.output):  # before the stage runs (a training stage would have started its workers)
        check_output_dir(Path(args.output), "--output")
    cfg = load_run_config(args.config, preset=args.preset, overrides=args.set)
    # stdout carries only the result JSON (scripts parse it); libraries that print (DeepSpeed's op
    # loader does) are sent to stderr with the logs.
    with contextlib.redirect_stdout(sys.stderr):
        manifest = run_stage(spec.name, cfg.section(spec.name), parse_inputs(args.input), args.output)
    if args.manifest_out:
        write_manifest_file(manifest, args.manifest_out)
    json.dump({"uri": manifest.uri, "kind": manifest.kind, "counts": manifest.counts,
               "metrics": manifest.metrics}, sys.stdout, indent=2)
    print()
    return 0
