"""What runs *inside* a kubellm KFP component: config string in, stage function, artifacts out.

The components in `components.py` are serialized source, so each is a few lines that import this
module (installed in every image) and call `run_component`. It has no kfp import: KFP artifacts are
used through `.path`, `.metadata` and `.log_metric`, which is all a component needs.

    run_component("tokenizer", config_text, "s3://bucket/kubellm",
                  inputs={"dataset": dataset.path},
                  outputs={"manifest": tokens, "metrics": metrics, "report": report})

A stage's output artifact file holds the manifest JSON (so the next stage's `Input[...]` path is a
valid `load_manifest_ref` reference); its metadata carries the artifact prefix and digest the UI shows.

Data prep can also run fanned out (`data_prep.fan_out`): `list_data_prep_shards` (the ParallelFor
items), `prepare_data_prep_shard` (the map, one pod per input shard) and `reduce_data_prep` (global
dedup, split, publish: the same `dataset` artifact `run_component("data_prep", ...)` writes).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from kubellm.core.errors import ConfigError
from kubellm.core.manifest import Manifest, fetch
from kubellm.core.storage import storage_for

HEADLINE = "[kubellm]"


def parse_section(stage: str, text: str) -> Any:
    """A stage's config section from the string parameter (JSON or YAML), validated strictly."""
    from kubellm.runconfig import load_section

    try:
        data = yaml.safe_load(text) if text and text.strip() else {}
    except yaml.YAMLError as e:
        raise ConfigError(f"pipeline parameter {stage}_config: not valid JSON/YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"pipeline parameter {stage}_config: expected a mapping, got {type(data).__name__}")
    return load_section(stage, data, f"pipeline parameter {stage}_config")


def _metadata(manifest: Manifest, extra: Mapping[str, str]) -> dict[str, Any]:
    md: dict[str, Any] = {"uri": manifest.uri, "digest": manifest.digest(), "kind": manifest.kind,
                          "code_version": manifest.code_version, "config_hash": manifest.config_hash}
    md.update({f"count_{k}": v for k, v in manifest.counts.items()})
    md.update(extra)
    return md


def headline(stage: str, manifest: Manifest) -> str:
    """The lines a person wants to see when a stage finishes (printed to the task log)."""
    lines = [f"{HEADLINE} {stage}: {manifest.kind} at {manifest.uri}"]
    counts = [f"{k}={v}" for k, v in manifest.counts.items() if v]  # zeros (filters that removed nothing) are noise
    if counts:
        lines.append(f"{HEADLINE} {stage} counts: " + ", ".join(counts[:16]) + (" …" if len(counts) > 16 else ""))
    if manifest.metrics:
        lines.append(f"{HEADLINE} {stage} metrics: " + ", ".join(
            f"{k}={v:.4g}" for k, v in manifest.metrics.items()))
    if manifest.report_markdown:
        lines.append(manifest.report_markdown.rstrip())
    return "\n".join(lines)


def write_outputs(stage: str, manifest: Manifest, outputs: Mapping[str, Any],
                  extra_metadata: Mapping[str, str] | None = None) -> None:
    """Manifest JSON + metadata into the main artifact, metrics, Markdown and (if the stage wrote
    one) the self-contained HTML report into theirs.

    The main artifact is written last and atomically: if anything before it fails (fetching the
    HTML report, say), its path holds no manifest a downstream step could take for a valid output."""
    md = _metadata(manifest, extra_metadata or {})
    main = outputs["manifest"]
    if "metrics" in outputs:
        m = outputs["metrics"]
        for k, v in {**manifest.metrics, **{k: float(v) for k, v in manifest.counts.items()}}.items():
            if isinstance(v, int | float) and math.isfinite(v):
                m.log_metric(k, float(v))
    if "report" in outputs:
        p = Path(outputs["report"].path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(manifest.report_markdown or f"# {stage}\n\n`{manifest.uri}`\n\n```json\n"
                     f"{json.dumps({'counts': manifest.counts, 'metrics': manifest.metrics}, indent=2)}\n```\n")
        outputs["report"].metadata["uri"] = manifest.uri
    if "html" in outputs:
        html_path = Path(outputs["html"].path)
        html_path.parent.mkdir(parents=True, exist_ok=True)
        if any(f.path == "report.html" for f in manifest.files):
            with tempfile.TemporaryDirectory() as tmp:
                fetch(manifest, tmp, paths=["report.html"])
                shutil.copyfile(Path(tmp) / "report.html", html_path)
        else:
            html_path.write_text(f"<html><body><p>{stage}: no HTML report in {manifest.uri}</p></body></html>")
        outputs["html"].metadata["uri"] = manifest.uri
    storage_for(main.path).write_bytes(main.path, manifest.to_json().encode())  # atomic: temp file + rename
    main.metadata.update(md)


@contextlib.contextmanager
def reported(stage: str) -> Iterator[None]:
    """The error's message above its traceback, every line prefixed `[kubellm]`, so the pod log and
    `kubellm run --local`'s summary (which keeps the `[kubellm]` lines) say what went wrong and where
    (file, record, field) — for a KubellmError and for an unexpected error alike."""
    try:
        yield
    except Exception as e:
        first, *rest = (str(e) or "(no message)").splitlines() or [""]
        lines = [f"{HEADLINE} {stage} failed: {type(e).__name__}: {first}"]
        lines += [f"{HEADLINE}   {ln.strip()}" for ln in rest if ln.strip()]
        print("\n".join(lines), file=sys.stderr, flush=True)
        raise


def _require_root(storage_root: str) -> None:
    if not storage_root:
        raise ConfigError("pipeline parameter storage_root is empty: expected a local dir or s3://bucket/prefix")


def run_component(stage: str, config_text: str, storage_root: str, inputs: Mapping[str, str],
                  outputs: Mapping[str, Any], extra_metadata: Mapping[str, str] | None = None, *,
                  never_promote: bool = False, defer_gate: bool = False) -> Manifest:
    """Validate the section, run the stage through the registry, write the artifacts, print the
    headline. Empty inputs ("" from an optional parameter) are dropped. `never_promote` (the
    evaluation report) turns the gate's promotion off whatever the parameter says — it may have been
    edited in the UI, past the CLI's checks. `defer_gate` (evaluate): publish the report and the
    verdict without applying it, so this step succeeds and its Metrics/Markdown/HTML reach the KFP UI
    (KFP uploads no outputs of a failed task); the pipeline's gate step (`run_gate`) applies it."""
    from kubellm.stages import STAGES, run_stage

    with reported(stage):
        _require_root(storage_root)
        config = parse_section(stage, config_text)
        if never_promote and config.gate.promote:
            print(f"{HEADLINE} {stage}: gate.promote ignored: this pipeline reports and never promotes", flush=True)
            config = config.model_copy(update={"gate": config.gate.model_copy(update={"promote": False})})
        given = {k: v for k, v in inputs.items() if v}
        if defer_gate:
            from kubellm.evaluate.stage import run as evaluate

            spec = STAGES["evaluate"]
            unknown = sorted(set(given) - set(spec.inputs) - set(spec.optional_inputs))
            if stage != "evaluate" or unknown:
                raise ConfigError(f"defer_gate is for the evaluate stage with its inputs (got {stage}, {unknown})")
            manifest = evaluate(config, given, storage_root, apply_gate=False)
        else:
            manifest = run_stage(stage, config, given, storage_root)
        write_outputs(stage, manifest, outputs, extra_metadata)
    print(headline(stage, manifest), flush=True)
    if defer_gate and manifest.metadata.get("gate_passed") is False:
        print(f"{HEADLINE} {stage}: the promotion gate FAILED (see the report); the gate step fails the run",
              flush=True)
    return manifest


def run_gate(results: str, *, promote: bool = True) -> None:
    """The pipelines' gate step: apply the verdict an evaluate artifact records
    (`kubellm.evaluate.registry.apply_gate`). Fails (GateFailedError naming each failed rule, and the
    report) when the gate failed; otherwise moves the promoted pointer to the candidate when the
    evaluation asked to promote and `promote` is true (the evaluation report passes false)."""
    from kubellm.core.manifest import load_manifest_ref
    from kubellm.evaluate.registry import apply_gate

    with reported("gate"):
        manifest = load_manifest_ref(results)
        entry = apply_gate(manifest, promote=promote)
    passed = manifest.metadata.get("gate_passed")
    pointer = manifest.metadata.get("pointer", "")
    if passed is None:
        print(f"{HEADLINE} gate: disabled (evaluate.gate.enabled false); nothing to apply", flush=True)
    elif entry is not None:
        print(f"{HEADLINE} gate: PASSED; promoted {entry.label} ({entry.model_uri}) -> {pointer}", flush=True)
    else:
        print(f"{HEADLINE} gate: PASSED; the pointer {pointer} was not moved (this run does not promote)", flush=True)


def list_data_prep_shards(config_text: str, storage_root: str, raw: str) -> list[str]:
    """Fan-out step 1: the input shards of `raw` as ParallelFor items, with a run-scoped work prefix
    (the KFP run id when the pod has it, else a fresh id) that the map and the reduce share.

    Each item is a JSON *string* (`kubellm.data_prep.stage.fan_out_shards`): KFP declares a loop
    item as a STRING input, and dicts of mixed value types do not survive its field selectors
    (kubeflow/pipelines#9366), so the map parses the item itself."""
    from kubellm.core.errors import InputDataError
    from kubellm.data_prep.stage import fan_out_shards

    with reported("data_prep"):
        _require_root(storage_root)
        config = parse_section("data_prep", config_text)
        run_key = os.environ.get("KUBELLM_KFP_RUN_ID") or uuid.uuid4().hex
        shards = fan_out_shards(raw, config, storage_root, run_key)
        if not shards:
            raise InputDataError(f"raw source {raw!r}: no input shards found")
    state = "already published; the map will skip" if shards[0]["done"] else f"work under {shards[0]['work']}"
    print(f"{HEADLINE} data_prep list-shards: {len(shards)} input shard(s) of {raw}; {state}", flush=True)
    return [json.dumps(s, sort_keys=True) for s in shards]


def _item(text: str | Mapping[str, Any]) -> Mapping[str, Any]:
    from kubellm.core.errors import InputDataError

    item = json.loads(text) if isinstance(text, str) else text
    if not isinstance(item, Mapping) or not {"index", "uri", "fingerprint", "work"} <= set(item):
        raise InputDataError(f"data-prep shard item {str(text)[:200]!r}: expected a list-shards item "
                             "(JSON object with index, uri, fingerprint, work)")
    return item


def prepare_data_prep_shard(config_text: str, shard_text: str) -> str:
    """Fan-out map: clean, filter, hash and MinHash one input shard into the work prefix."""
    from kubellm.data_prep.stage import prepare_fan_out_shard

    with reported("data_prep"):
        shard = _item(shard_text)
        summary = prepare_fan_out_shard(shard, parse_section("data_prep", config_text))
    print(f"{HEADLINE} data_prep prepare-shard {shard['index']} ({shard['uri']}): {summary}", flush=True)
    return json.dumps(summary, sort_keys=True)


def reduce_data_prep(config_text: str, storage_root: str, shard_texts: list[Any], prepared: list[str],
                     outputs: Mapping[str, Any]) -> Manifest:
    """Fan-out reduce: check every shard was prepared, then global dedup, split and publish the dataset."""
    from kubellm.core.errors import InputDataError
    from kubellm.data_prep.stage import reduce_fan_out

    with reported("data_prep"):
        _require_root(storage_root)
        config = parse_section("data_prep", config_text)
        shards = [_item(t) for t in shard_texts]
        done = sorted(int(json.loads(p)["index"]) for p in prepared)
        if done != sorted(int(s["index"]) for s in shards):
            raise InputDataError(f"dedup-reduce: prepare-shard reported shards {done}, list-shards listed "
                                 f"{len(shards)}")
        manifest = reduce_fan_out(shards, config, storage_root)
        write_outputs("data_prep", manifest, outputs, {"fan_out_shards": str(len(shards))})
    print(headline("data_prep", manifest), flush=True)
    return manifest
