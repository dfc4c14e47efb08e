"""`kubellm` — the command line used by people and by every container.

    kubellm --help
    kubellm data-prep --config run.yaml --input raw=./corpus --output s3://bucket/kubellm
    kubellm run --local --preset debug

Each command lives in its own module exposing `configure(parser)` and `main(args) -> int`; this
file only lists them, so `kubellm --help` needs no heavy import.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from kubellm.core.errors import KubellmError

# (command, one-line help, module). Stage commands are generated from the stage registry.
COMMANDS: list[tuple[str, str, str]] = [
    ("data-prep", "clean, filter and deduplicate raw text into parquet shards", "kubellm.stage_cli"),
    ("tokenizer", "train byte-level BPE and encode the corpus into packed token shards", "kubellm.stage_cli"),
    ("pretrain", "pretrain the base model with DeepSpeed (ZeRO/TP/PP) and export it", "kubellm.stage_cli"),
    ("sft", "supervised fine-tuning on chat data with assistant-only loss", "kubellm.stage_cli"),
    ("dpo", "align the SFT model with direct preference optimisation", "kubellm.stage_cli"),
    ("evaluate", "lm-eval the exported models, write the report and apply the gate", "kubellm.stage_cli"),
    ("demo-world", "generate the deterministic demo world (corpus, chat, preferences, eval items)",
     "kubellm.data_prep.demo_world"),
    ("run", "run a pipeline end to end (--local: kfp.local on this machine)", "kubellm.pipelines.local_run"),
    ("compile", "compile the KFP pipelines to IR YAML", "kubellm.pipelines.compile"),
    ("submit", "submit a pipeline run to a Kubeflow Pipelines endpoint", "kubellm.pipelines.submit"),
    ("schedule", "create or update the recurring evaluation-report run", "kubellm.pipelines.schedule"),
    ("plan", "pick ZeRO stage, TP, PP and pod resources for a model and a GPU count",
     "kubellm.training.planner"),
    ("generate", "chat with or complete text from an exported model", "kubellm.model.generate"),
    ("launch-worker", "(internal) the per-process training entrypoint torchrun starts",
     "kubellm.training.worker"),
]


#: Client libraries whose DEBUG logs print signed request headers and credentials (botocore: the access
#: key id, the signature, the session token; kubernetes/kfp's REST clients: the bearer token).
CLIENT_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "kubernetes", "kfp_server_api")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubellm", description="Build an LLM from scratch on Kubeflow.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text, module in COMMANDS:
        # add_help=False: `kubellm CMD --help` is answered by the command's own parser (second pass)
        p = sub.add_parser(name, help=help_text, description=help_text, add_help=False)
        p.set_defaults(_module=module, _command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # First pass: find the command; then let its module add its own arguments.
    known, _ = parser.parse_known_args(argv)
    if not getattr(known, "command", None):
        parser.print_help()
        return 0 if not argv else 2
    logging.basicConfig(
        level=logging.DEBUG if known.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in CLIENT_LOGGERS:  # their DEBUG output carries request headers: never turned on by --verbose
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        module = importlib.import_module(known._module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("kubellm"):
            print(f"kubellm {known.command}: not implemented yet ({known._module} is missing)", file=sys.stderr)
            return 2
        raise
    sub = argparse.ArgumentParser(prog=f"kubellm {known.command}",
                                  description=dict((c, h) for c, h, _ in COMMANDS)[known.command])
    module.configure(sub, known.command)
    idx = argv.index(known.command)
    args = sub.parse_args(argv[idx + 1 :])
    args.command = known.command
    try:
        code = int(module.main(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except KubellmError as e:
        print(f"kubellm {known.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # a pipe or socket of the command's own broke: that is an error to report
        # the reader went away (`kubellm plan ... | head`): stop quietly, as Unix tools do, and point
        # stdout at /dev/null so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the closed pipe
    except KeyboardInterrupt:
        print(f"kubellm {known.command}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT
    except OSError as e:  # a path of the user's (permissions, a file where a directory goes, a full disk)
        print(f"kubellm {known.command}: error: {e}", file=sys.stderr)
        return 1


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports POLLERR on its write end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fileno (captured), or no poll on this platform
        return False


if __name__ == "__main__":
    sys.exit(main())
