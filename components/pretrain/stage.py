"""The pretrain stage: train the base model on the token shards with DeepSpeed, export it as HF Llama.

    kubellm pretrain --preset debug --input tokens=out/tokenizer/<hash> --output out
    kubellm pretrain --config run.yaml --set pretrain.launch.nproc_per_node=2 --input tokens=... --output s3://b/k

`run(config, inputs, output)` (input `tokens`: a tokenizer-stage artifact; optional `resume`: a run
dir whose committed checkpoint to continue) launches itself with `launch.nproc_per_node ×
launch.nnodes` processes — locally through torchrun/TorchX, or as a PyTorchJob with
`launch.backend: pytorchjob` — unless it already is one process of such a job (or the job has one
process, which then trains in this process). Every rank runs `run_worker`; rank 0 exports the final
weights (`kubellm.model.hf.export_hf`, tokenizer included) and metrics, and publishes a `model`
artifact under a content-addressed prefix. Checkpoints live under `output/runs/<run-id>/checkpoints`;
the run id is `$KUBELLM_RUN_ID`, else `pretrain-kfp-<KFP run id>` inside a pipeline (every retry of
the task resumes the same run dir and re-attaches to the same PyTorchJob), else a fresh timestamp id
(`kubellm.training.job.new_run_id`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from kubellm.core.errors import ConfigError, InputDataError
from kubellm.core.manifest import Manifest, content_prefix, load_manifest_ref, read_manifest
from kubellm.core.storage import join, storage_for
from kubellm.pretrain.config import PretrainConfig
from kubellm.training.job import JobSpec, check_before_launch, launch_job, run_dir_for

STAGE = "pretrain"


def _check(config: PretrainConfig, tokens: Manifest) -> None:
    """Refuse inputs that cannot work before launching anything."""
    model_cfg = config.model.build()
    vocab = tokens.metadata.get("vocab_size")
    if vocab is not None and int(vocab) > model_cfg.vocab_size:
        raise ConfigError(
            f"{tokens.uri}: the tokenizer's vocab_size is {vocab} but pretrain.model vocab_size is "
            f"{model_cfg.vocab_size}; set pretrain.model.overrides.vocab_size ≥ {vocab}"
        )
    split = config.data.split
    if not any(f.path.startswith(f"{split}/") and f.path.endswith(".tok") for f in tokens.files):
        raise InputDataError(f"{tokens.uri}: no {split}/*.tok shards (pretrain.data.split={split!r})")
    # the layout / ZeRO / precision checks the workers run at start-up, here, before any launch
    check_before_launch(STAGE, model_cfg, config.train, config.parallel, config.launch)


def _hash(config: PretrainConfig) -> str:
    # `launch` says where the job runs, not what it computes: it stays out of the content address
    from kubellm.core.manifest import stable_hash

    return stable_hash(config.model_dump(mode="json", exclude={"launch"}))


def run(config: PretrainConfig, inputs: Mapping[str, str], output: str) -> Manifest:
    from kubellm.training.process_group import in_distributed_worker

    tokens = load_manifest_ref(inputs["tokens"])
    _check(config, tokens)
    parents = {"tokens": tokens.digest()}
    prefix = content_prefix(output, STAGE, _hash(config), parents)
    if storage_for(prefix).exists(join(prefix, "_manifest.json")):
        return read_manifest(prefix)  # the same config on the same data is already trained
    world = config.launch.nproc_per_node * config.launch.nnodes
    run_id, run_dir = run_dir_for(STAGE, inputs, output, prefix, world)
    spec = JobSpec(stage=STAGE, config=config.model_dump(mode="json"), inputs=dict(inputs), output=output,
                   run_dir=run_dir, prefix=prefix, parents=parents)
    if in_distributed_worker() or (config.launch.backend == "local" and world == 1):
        manifest = run_worker(spec)
        assert manifest is not None or int(os.environ.get("RANK", "0")) != 0
        return manifest  # type: ignore[return-value]
    return launch_job(spec, config.launch, name=f"{STAGE}-{run_id}")


def run_worker(spec: JobSpec) -> Manifest | None:
    """One process of the training job (all ranks); rank 0 returns the published manifest."""
    import torch.distributed as dist

    from kubellm.pretrain.objective import PretrainObjective
    from kubellm.training.data import stage_artifact_files
    from kubellm.training.engine import train
    from kubellm.training.model_stage import export_trained
    from kubellm.training.process_group import init_distributed, resolve_device

    config = PretrainConfig.model_validate(spec.config)
    model_cfg = config.model.build()
    tokens = load_manifest_ref(spec.inputs["tokens"])
    rank, world = init_distributed(resolve_device(config.train.device))
    split = config.data.split
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    root, paths = stage_artifact_files(tokens, [f"{split}/", "tokenizer/"], config.data.cache_dir,
                                       fetch_here=local_rank == 0)
    if world > 1:
        dist.barrier()  # local rank 0 has fetched the shards
    shards = [str(root / p) for p in paths if p.startswith(f"{split}/") and p.endswith(".tok")]
    objective = PretrainObjective(shards, seq_len=config.train.seq_len, vocab_size=model_cfg.vocab_size,
                                  doc_masking=config.data.doc_masking, shuffle=config.data.shuffle,
                                  prefetch=config.train.prefetch_batches, rank=rank, world=world)
    result = train(model_cfg, config.train, config.parallel, objective, spec.run_dir, resume=True,
                   identity=spec.identity, consolidate_final=False)
    tok_dir = root / "tokenizer" if any(p.startswith("tokenizer/") for p in paths) else None
    out = export_trained(result, model_cfg, STAGE, tok_dir)  # every rank: written a shard at a time
    if out is None:
        return None
    assert result.metrics_path is not None
    return _publish(spec, config, tokens, result, out)


def _publish(spec: JobSpec, config: PretrainConfig, tokens: Manifest, result: object, out: Path) -> Manifest:
    """Rank 0: publish `out` (`export_trained`'s directory, removed afterwards) with the metrics."""
    from kubellm.core.manifest import publish_dir
    from kubellm.model.flops import num_params
    from kubellm.training.engine import TrainResult
    from kubellm.training.metrics import markdown_report, plot_loss_curve
    from kubellm.training.runfiles import local_work_dir, upload_run_files

    assert isinstance(result, TrainResult)
    model_cfg = config.model.build()
    try:
        metrics_src = Path(result.metrics_path or "")
        (out / "metrics").mkdir()
        shutil.copy2(metrics_src, out / "metrics" / "metrics.jsonl")
        tb = metrics_src.parent / "tensorboard"
        if tb.is_dir():
            shutil.copytree(tb, out / "metrics" / "tensorboard")
        plot_loss_curve(metrics_src, out / "metrics" / "loss_curve.png", title="pretrain loss")
        upload_run_files(local_work_dir(spec.run_dir), spec.run_dir)
        summary = dict(result.summary)
        counts = {"steps": int(summary.get("steps", 0)), "tokens_seen": int(summary.get("tokens_seen", 0)),
                  "parameters": num_params(model_cfg), "world_size": result.world_size}
        md = "\n".join([
            f"## Pretrain: {config.model.preset} model, {counts['parameters']:,} parameters",
            "",
            f"{counts['steps']} steps on {result.world_size} process(es), ZeRO stage "
            f"{config.train.zero_stage}, {config.train.precision}; loss "
            f"{summary.get('loss_start', float('nan')):.3f} → {summary.get('loss_final', float('nan')):.3f}.",
            "",
            markdown_report(summary, "metrics/loss_curve.png", result.peak_source,
                            {"export": "hf/ (LlamaForCausalLM, safetensors)", "run dir": spec.run_dir}),
        ])
        manifest = publish_dir(
            out, spec.prefix, kind="model", counts=counts, metrics=summary, config_hash=_hash(config),
            parents={"tokens": tokens.digest()},
            metadata={"model_config": model_cfg.model_dump(mode="json"), "export_path": "hf",
                      "export_uri": join(spec.prefix, "hf"), "final_loss": summary.get("loss_final"),
                      "run_dir": spec.run_dir, "tokenizer": tokens.uri,
                      "vocab_size": tokens.metadata.get("vocab_size"),
                      "bos_id": tokens.metadata.get("bos_id"), "eos_id": tokens.metadata.get("eos_id"),
                      "pad_id": tokens.metadata.get("pad_id")},
            report_markdown=md,
        )
        return manifest
    finally:
        shutil.rmtree(out, ignore_errors=True)
