"""The SFT stage: fine-tune a model artifact on chat data with loss on assistant tokens only.

    kubellm sft --preset debug --input model=<pretrain artifact> --input chat=.kubellm/demo/chat \
        --output .kubellm/artifacts

`chat` is one or more JSON-lines files/dirs/globs or `s3://` prefixes of `{"messages": [...]}` records.
Conversations are rendered with the model's tokenizer chat template, labelled on assistant tokens
only, and packed several to a sequence with document masking (attention and loss never cross
conversations). Every `heldout_every`-th conversation is held out: the report shows its
assistant-token loss before the first step and after the last, scored through the training engine
(`kubellm.training.evaluation.Evaluation`). The base model's weights are read tensor by tensor as each
rank fills its model (`kubellm.model.hf.open_hf`). Same engine, ZeRO options, launch and export as pretrain.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from kubellm.core.errors import InputDataError
from kubellm.core.manifest import Manifest, content_prefix, stable_hash
from kubellm.sft.config import SFTConfig
from kubellm.sft.data import SkipReport
from kubellm.training.job import JobSpec
from kubellm.training.model_stage import (
    export_trained,
    fetch_model,
    launch_or_run,
    publish_model,
    start_worker,
)

STAGE = "sft"
T = TypeVar("T")


def source_fingerprint(raw: str) -> str:
    """What the chat/preference sources are, by content (keys + sizes/ETags or mtimes)."""
    from kubellm.data_prep.sources import resolve_sources

    return stable_hash([s.fingerprint for s in resolve_sources(raw)])


def stage_jsonl(raw: str, tmp: Path) -> dict[Path, str]:
    """Each source of `raw` as a local file (S3 objects downloaded under `tmp`), in order, mapped to
    the URI messages name it by."""
    from kubellm.data_prep.sources import resolve_sources, stage_local

    return {stage_local(s, tmp): s.uri for s in resolve_sources(raw)}


def config_hash(config: SFTConfig | object) -> str:
    # `launch` says where the job runs, not what it computes
    return stable_hash(config.model_dump(mode="json", exclude={"launch"}))  # type: ignore[union-attr]


def no_usable_records(what: str, source: str, report: SkipReport) -> InputDataError:
    """The error for a source with nothing left to train on after the bad records were skipped."""
    first = "".join(f"\n- {e}" for e in report.examples[:5])
    return InputDataError(f"{source}: 0 usable {what} found ({report.total} record(s) skipped: "
                          f"{report.summary()}){first}")


def hold_out(items: Sequence[T], every: int, what: str, source: str, report: SkipReport) -> tuple[list[T], list[T]]:
    """(train, held out): the 1st, (every+1)-th, … usable record is held out, the rest trained on; a
    source too small to leave anything to train on fails, naming it."""
    held = [e for i, e in enumerate(items) if i % every == 0]
    train = [e for i, e in enumerate(items) if i % every]
    if not train:
        raise InputDataError(f"{source}: only {len(items)} usable {what}, all held out (heldout_every={every}), "
                             f"none left to train on; add data (skipped records: {report.summary()})")
    return train, held


def _fmt(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.3f}"


def run(config: SFTConfig, inputs: Mapping[str, str], output: str) -> Manifest:
    base = fetch_model(inputs["model"], fetch_here=False)  # shape and digest only: the workers fetch the weights
    parents = {"model": base.digest, "chat": source_fingerprint(inputs["chat"])}
    prefix = content_prefix(output, STAGE, config_hash(config), parents)
    return launch_or_run(STAGE, config, inputs, output, prefix, run_worker, model_cfg=base.config, parents=parents)


def run_worker(spec: JobSpec) -> Manifest | None:
    from kubellm.sft.data import SkipReport, pack_examples, read_chat_jsonl
    from kubellm.sft.objective import SFTObjective, packs_to_arrays
    from kubellm.training.engine import train
    from kubellm.training.evaluation import Evaluation

    config = SFTConfig.model_validate(spec.config)
    w = start_worker(spec, config.train)
    base, tok, model_cfg = w.base, w.tokenizer, w.model_config
    report = SkipReport()
    with tempfile.TemporaryDirectory(prefix="kubellm-sft-") as tmp:
        staged = stage_jsonl(spec.inputs["chat"], Path(tmp))
        examples = list(read_chat_jsonl(list(staged), tok, config.train.seq_len, report, config.on_bad_record,
                                        labels=staged))
    if not examples:
        raise no_usable_records("conversations", spec.inputs["chat"], report)
    train_ex, held = hold_out(examples, config.heldout_every, "conversation(s)", spec.inputs["chat"], report)
    packs = pack_examples(train_ex, config.train.seq_len, tok.pad_token_id)
    held_packs = pack_examples(held, config.train.seq_len, tok.pad_token_id)
    # the held-out packs are scored through the training engine before the first step and after the last
    # (every replica its share, on the training device and in its precision; no rank holds the whole model)
    result = train(model_cfg, config.train, config.parallel, SFTObjective(packs, tok.pad_token_id), spec.run_dir,
                   init_state_dict=w.weights, resume=True, identity=spec.identity,
                   evaluate={"heldout": Evaluation(packs_to_arrays(held_packs), at_start=True)},
                   consolidate_final=False)
    out = export_trained(result, model_cfg, STAGE, base.hf_dir)  # every rank: written a shard at a time
    if out is None:
        return None
    # None only where there is nothing to report: a resume from a checkpoint that did not record the start
    before = result.scores["start"].get("heldout", {}).get("loss")
    after = result.scores["end"]["heldout"].get("loss")
    scores = {"heldout_assistant_loss_before": before, "heldout_assistant_loss_after": after}
    trained_tokens = sum(e.trainable_tokens for e in train_ex)
    skipped = report.summary()
    return publish_model(
        spec, out, stage=STAGE, model_cfg=model_cfg, result=result,
        parents=spec.parents,
        config_hash=config_hash(config), title=f"SFT: {len(train_ex)} conversations in {len(packs)} packed sequences",
        counts={"conversations": len(train_ex), "heldout_conversations": len(held), "packed_sequences": len(packs),
                "assistant_tokens": trained_tokens, "skipped_records": report.total},
        metrics={k: v for k, v in scores.items() if v is not None},
        report_lines=[f"Held-out assistant-token loss {_fmt(before)} → {_fmt(after)} "
                      f"({len(held)} conversations).", "", f"Skipped records: {skipped}.",
                      *(f"- {e}" for e in report.examples[:5])],
        metadata={"base_model": base.manifest.uri if base.manifest else str(base.hf_dir),
                  "skipped": report.counts},
    )
