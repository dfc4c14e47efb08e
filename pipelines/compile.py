"""`kubellm compile`: write the KFP IR YAML of each pipeline, for upload in the Kubeflow UI.

    kubellm compile --run-config run.yaml --output build/pipelines
    kubellm compile --preset debug --registry registry.example.com/ml --tag 1a2b3c \
        --param raw_source=s3://bucket/raw/ --output build/pipelines
    # -> build/pipelines/llm_from_scratch.yaml, build/pipelines/evaluation_report.yaml

The run-config's section values become the pipelines' parameter defaults (what the UI pre-fills);
`--registry/--tag` pick the images of every step (kubellm.core.images.image_for).
"""

from __future__ import annotations

import argparse

from kubellm.pipelines.common import (
    add_config_args,
    add_image_args,
    compile_pipelines,
    load_config,
    settings_from_args,
)
from kubellm.pipelines.definitions import PIPELINES


def configure(p: argparse.ArgumentParser, command: str) -> None:
    add_config_args(p)
    add_image_args(p)
    p.add_argument("--output", "-o", default="build/pipelines", help="directory for the YAML files")
    p.add_argument("--pipeline", action="append", choices=PIPELINES,
                   help="compile only this pipeline (repeatable; default: all)")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    names = tuple(args.pipeline) if args.pipeline else PIPELINES
    for name, path in compile_pipelines(cfg, settings_from_args(args), args.output, names).items():
        print(f"{name}: {path}")
    return 0
