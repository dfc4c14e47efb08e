"""The KFP components: one thin lightweight component per stage, plus the small uncached resolvers.

Each stage component is a few lines around `kubellm.pipelines.runtime.run_component`, which calls the
plain stage function through `kubellm.stages.run_stage`. Imports live inside the function bodies
because a lightweight component is shipped as its source text and executed in the stage's image
(kubellm and kfp are installed there; `install_kfp_package=False` keeps pods from pip-installing).
The same definitions run under `kfp.local.SubprocessRunner(use_venv=False)` and on a cluster.

Parameters every stage takes:
  config        the stage's run-config section as a JSON/YAML string — one parameter per stage, so
                changing DPO's beta changes only DPO's cache key and every upstream step is reused
  storage_root  where stages publish content-addressed outputs (local dir or s3://bucket/prefix)
Input artifacts hold a manifest JSON (`kubellm.core.manifest.load_manifest_ref(artifact.path)`).

The `base_image` below is a placeholder; `definitions.build_pipelines` sets every task's image from
one registry/tag setting (`kubellm.core.images.image_for`) at compile time.
"""

# No `from __future__ import annotations`: kfp reads the annotations as types, not strings.

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from kubellm.core.images import image_for


def _image(stage: str) -> str:
    return image_for(stage, registry="", tag="latest", digest="")


@dsl.component(base_image=_image("base"), install_kfp_package=False)
def fingerprint_source(source: str, name: str = "source") -> str:
    """Fingerprint a source (local path/glob, s3:// prefix or hf: dataset) over the files the stage that
    reads it will read (kubellm.pipelines.fingerprint). `name`: the pipeline parameter it came from, for
    errors. Runs uncached; its output is a parameter of the cached step that reads the source."""
    from kubellm.pipelines.fingerprint import fingerprint
    from kubellm.pipelines.runtime import reported

    with reported("fingerprint"):
        fp = fingerprint(source, name)
    print(f"[kubellm] fingerprint {source}: {fp}")
    return fp


@dsl.component(base_image=_image("base"), install_kfp_package=False)
def resolve_models(model_uris: list, promoted_pointer: str) -> NamedTuple(  # type: ignore[valid-type]
        "Resolved", models=str, baseline=str, fingerprint=str):
    """Resolve the models to evaluate (the given URIs, else the promoted model) and the baseline (the
    promoted model's pointer target). Runs uncached: the pointer moves under the same name."""
    from collections import namedtuple

    from kubellm.pipelines.fingerprint import fingerprint_models, resolve_models
    from kubellm.pipelines.runtime import reported

    with reported("resolve models"):
        models, promoted = resolve_models([str(m) for m in model_uris], promoted_pointer)
        fp = fingerprint_models(models) + "|" + promoted.fingerprint
    print(f"[kubellm] models: {models}; baseline: {promoted.uri or '<none>'}")
    # baseline = the pointer (what the evaluate stage reads, and moves unless the report never promotes)
    return namedtuple("Resolved", ["models", "baseline", "fingerprint"])(  # type: ignore[call-arg]
        ",".join(models), promoted.pointer, fp)


@dsl.component(base_image=_image("base"), install_kfp_package=False)
def resolve_promoted(promoted_pointer: str) -> NamedTuple(  # type: ignore[valid-type]  # kfp's idiom
        "Promoted", pointer=str, uri=str, fingerprint=str):
    """Resolve the promoted-model pointer to its target prefix (uri "" when none is promoted yet; the
    pointer is passed on either way, so the first promotion lands there). Runs uncached: the pointer
    moves under the same name."""
    from collections import namedtuple

    from kubellm.pipelines.fingerprint import resolve_promoted as resolve
    from kubellm.pipelines.runtime import reported

    with reported("resolve promoted model"):
        p = resolve(promoted_pointer)
    print(f"[kubellm] promoted model: {p.uri or '<none>'}")
    return namedtuple("Promoted", ["pointer", "uri", "fingerprint"])(  # type: ignore[call-arg]
        p.pointer, p.uri, p.fingerprint)


@dsl.component(base_image=_image("data_prep"), install_kfp_package=False)
def data_prep(config: str, storage_root: str, raw: str, raw_fingerprint: str, dataset: Output[Dataset],
              metrics: Output[Metrics], report: Output[Markdown]):
    """Clean, filter and deduplicate raw text into parquet shards (kubellm.data_prep.stage)."""
    from kubellm.pipelines.runtime import run_component

    run_component("data_prep", config, storage_root, {"raw": raw},
                  {"manifest": dataset, "metrics": metrics, "report": report},
                  {"source_fingerprint": raw_fingerprint})


@dsl.component(base_image=_image("data_prep"), install_kfp_package=False)
def list_shards(config: str, storage_root: str, raw: str, raw_fingerprint: str) -> list:
    """Fan-out data prep, 1/3: the raw source's input shards as ParallelFor items (JSON strings: index,
    uri, fingerprint, run-scoped work prefix). `raw_fingerprint` keys the cache: new files re-list."""
    from kubellm.pipelines.runtime import list_data_prep_shards

    print(f"[kubellm] raw fingerprint: {raw_fingerprint}")
    return list_data_prep_shards(config, storage_root, raw)


@dsl.component(base_image=_image("data_prep"), install_kfp_package=False)
def prepare_shard(config: str, shard: str) -> str:
    """Fan-out data prep, 2/3 (map, one pod per input shard): decode, normalise, filter, scrub, and
    write the docs, exact-dedup keys and MinHash signatures under the work prefix."""
    from kubellm.pipelines.runtime import prepare_data_prep_shard

    return prepare_data_prep_shard(config, shard)


@dsl.component(base_image=_image("data_prep"), install_kfp_package=False)
def dedup_reduce(config: str, storage_root: str, shards: list, prepared: list, dataset: Output[Dataset],
                 metrics: Output[Metrics], report: Output[Markdown]):
    """Fan-out data prep, 3/3 (reduce): global exact + MinHash near dedup over all shards, the
    deterministic split, parquet shards and the report: the same `dataset` artifact as data-prep."""
    from kubellm.pipelines.runtime import reduce_data_prep

    reduce_data_prep(config, storage_root, list(shards), [str(p) for p in prepared],
                     {"manifest": dataset, "metrics": metrics, "report": report})


@dsl.component(base_image=_image("tokenizer"), install_kfp_package=False)
def tokenizer(config: str, storage_root: str, dataset: Input[Dataset], tokens: Output[Dataset],
              metrics: Output[Metrics], report: Output[Markdown]):
    """Train byte-level BPE and encode the corpus into packed token shards (kubellm.tokenizer.stage)."""
    from kubellm.pipelines.runtime import run_component

    run_component("tokenizer", config, storage_root, {"dataset": dataset.path},
                  {"manifest": tokens, "metrics": metrics, "report": report})


@dsl.component(base_image=_image("pretrain"), install_kfp_package=False)
def pretrain(config: str, storage_root: str, tokens: Input[Dataset], model: Output[Model],
             metrics: Output[Metrics], report: Output[Markdown]):
    """Pretrain the base model with DeepSpeed and export it in HF format (kubellm.pretrain.stage)."""
    from kubellm.pipelines.runtime import run_component

    run_component("pretrain", config, storage_root, {"tokens": tokens.path},
                  {"manifest": model, "metrics": metrics, "report": report})


@dsl.component(base_image=_image("sft"), install_kfp_package=False)
def sft(config: str, storage_root: str, model: Input[Model], chat: str, chat_fingerprint: str,
        sft_model: Output[Model], metrics: Output[Metrics], report: Output[Markdown]):
    """Supervised fine-tuning on chat data, loss on assistant tokens only (kubellm.sft.stage)."""
    from kubellm.pipelines.runtime import run_component

    run_component("sft", config, storage_root, {"model": model.path, "chat": chat},
                  {"manifest": sft_model, "metrics": metrics, "report": report},
                  {"source_fingerprint": chat_fingerprint})


@dsl.component(base_image=_image("dpo"), install_kfp_package=False)
def dpo(config: str, storage_root: str, model: Input[Model], preferences: str, preferences_fingerprint: str,
        dpo_model: Output[Model], metrics: Output[Metrics], report: Output[Markdown]):
    """Direct preference optimisation of the SFT model (kubellm.dpo.stage)."""
    from kubellm.pipelines.runtime import run_component

    run_component("dpo", config, storage_root, {"model": model.path, "preferences": preferences},
                  {"manifest": dpo_model, "metrics": metrics, "report": report},
                  {"source_fingerprint": preferences_fingerprint})


@dsl.component(base_image=_image("evaluate"), install_kfp_package=False)
def evaluate(config: str, storage_root: str, base_model: Input[Model], sft_model: Input[Model],
             dpo_model: Input[Model], tokens: Input[Dataset], baseline: str, baseline_fingerprint: str,
             results: Output[Dataset], metrics: Output[Metrics], report: Output[Markdown],
             report_html: Output[HTML]):
    """lm-eval the base, SFT and DPO models side by side against the promoted baseline and write the
    report with the gate's verdict (kubellm.evaluate.stage). Succeeds whatever the verdict, so the
    report reaches the UI; the `gate` step after it applies the verdict."""
    from kubellm.pipelines.runtime import run_component

    models = ",".join([base_model.path, sft_model.path, dpo_model.path])
    run_component("evaluate", config, storage_root,
                  {"models": models, "tokens": tokens.path, "pointer": baseline},
                  {"manifest": results, "metrics": metrics, "report": report, "html": report_html},
                  {"baseline_fingerprint": baseline_fingerprint}, defer_gate=True)


@dsl.component(base_image=_image("evaluate"), install_kfp_package=False)
def evaluate_models(config: str, storage_root: str, models: str, baseline: str, models_fingerprint: str,
                    tokens: str, results: Output[Dataset], metrics: Output[Metrics],
                    report: Output[Markdown], report_html: Output[HTML]):
    """lm-eval registered models (comma-separated artifact prefixes) against the promoted baseline
    and publish the report with the gate's verdict (kubellm.evaluate.stage); never promotes."""
    from kubellm.pipelines.runtime import run_component

    run_component("evaluate", config, storage_root, {"models": models, "tokens": tokens, "pointer": baseline},
                  {"manifest": results, "metrics": metrics, "report": report, "html": report_html},
                  {"models_fingerprint": models_fingerprint}, never_promote=True, defer_gate=True)


@dsl.component(base_image=_image("base"), install_kfp_package=False)
def gate(results: Input[Dataset], promote: bool):
    """Apply the evaluation's promotion gate: fail the run naming each failed rule (the evaluate step
    has already published its report), else — with `promote` and gate.promote — move the promoted
    pointer to the candidate (conditional write; refused if the pointer moved since the evaluation).
    Runs uncached: the pointer moves under the same name."""
    from kubellm.pipelines.runtime import run_gate

    run_gate(results.path, promote=promote)
