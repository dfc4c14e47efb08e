"""What the post-training stages (SFT, DPO) share: start from a model artifact, launch, publish.

    base = fetch_model(inputs["model"])            # manifest, local HF dir, ModelConfig
    manifest = launch_or_run("sft", config, inputs, output, prefix, run_worker, model_cfg=base.config)
    ... in run_worker (rank 0): publish_model(spec, ...)

The launch path is the pretrain stage's: a `JobSpec` handed to `kubellm.training.job.launch_job`
(torchrun / TorchX locally, a PyTorchJob on the cluster), whose workers call the stage's
`run_worker(spec)`.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubellm.core.errors import InputDataError, IntegrityError
from kubellm.core.manifest import (
    MANIFEST_NAME,
    Manifest,
    is_plain_hf_dir,
    load_manifest_ref,
    publish_dir,
    read_manifest,
)
from kubellm.core.storage import join, storage_for
from kubellm.model.config import ModelConfig
from kubellm.training.job import JobSpec, check_before_launch, launch_job, run_dir_for


@dataclasses.dataclass
class BaseModel:
    manifest: Manifest | None
    """The model artifact's manifest (None for a plain local HF directory)."""
    hf_dir: Path
    """A local HF LlamaForCausalLM directory (weights, config, tokenizer)."""
    config: ModelConfig

    @property
    def digest(self) -> str:
        """The artifact's content digest; for a plain HF directory, its files' resolved paths, sizes and
        mtimes (as for local data sources), so re-exporting another model into the same directory
        is a new input, not a reuse of what was trained on the old one."""
        if self.manifest:
            return self.manifest.digest()
        from kubellm.data_prep.sources import directory_fingerprint

        return directory_fingerprint(self.hf_dir)


def fetch_model(ref: str, cache_dir: str | Path | None = None, fetch_here: bool = True) -> BaseModel:
    """Resolve a model input: a `model` artifact (manifest file or prefix) or a local HF directory."""
    from kubellm.model.hf import config_from_hf
    from kubellm.training.data import stage_artifact_files

    p = Path(ref)
    if is_plain_hf_dir(ref):
        import json

        return BaseModel(None, p, config_from_hf(json.loads((p / "config.json").read_text()), str(p / "config.json")))
    manifest = load_manifest_ref(ref)
    if manifest.kind != "model":
        raise IntegrityError(f"{manifest.uri}: is a {manifest.kind!r} artifact, expected a 'model' artifact")
    export = str(manifest.metadata.get("export_path", "hf"))
    root, _ = stage_artifact_files(manifest, [f"{export}/"], cache_dir, fetch_here=fetch_here)
    cfg = ModelConfig.model_validate(manifest.metadata["model_config"])
    return BaseModel(manifest, root / export, cfg)


@dataclasses.dataclass
class WorkerStart:
    """What a post-training worker has after start-up: its place in the job and the starting model."""

    rank: int
    world: int
    base: BaseModel
    tokenizer: Any
    weights: Any
    """The base export's weights (`kubellm.model.hf.HFWeights`): checked, but read only tensor by tensor
    as the engine fills its model (or TP shard / pipeline stage) from them."""
    model_config: ModelConfig


def start_worker(spec: JobSpec, train_cfg: Any) -> WorkerStart:
    """Join the process group, make the base model's export readable on this node (local rank 0
    fetches, the others wait), load its tokenizer and open its weights (no rank holds them whole)."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from kubellm.model.hf import open_hf
    from kubellm.training.process_group import init_distributed, resolve_device

    rank, world = init_distributed(resolve_device(train_cfg.device))
    base = fetch_model(spec.inputs["model"], fetch_here=int(os.environ.get("LOCAL_RANK", "0")) == 0)
    if world > 1:
        dist.barrier()
    tokenizer = AutoTokenizer.from_pretrained(str(base.hf_dir))
    if tokenizer.pad_token_id is None:  # SFT packs and DPO pairs are padded with it (label-masked)
        raise InputDataError(
            f"{spec.inputs['model']}: the model's tokenizer has no pad_token (tokenizer_config.json): SFT and DPO "
            "pad sequences with it; set `pad_token` to a special token the texts do not use (kubellm's own "
            "exports have `<|pad|>`)")
    weights, model_cfg = open_hf(base.hf_dir)
    return WorkerStart(rank, world, base, tokenizer, weights, model_cfg)


def launch_or_run(stage: str, config: Any, inputs: Mapping[str, str], output: str, prefix: str,
                  run_worker: Any, *, model_cfg: ModelConfig, parents: Mapping[str, str]) -> Manifest:
    """Reuse a committed artifact at `prefix`, else train: in this process when the job has one
    process (or this already is a worker), otherwise through the stage's launch backend."""
    from kubellm.training.process_group import in_distributed_worker

    world = config.launch.nproc_per_node * config.launch.nnodes
    # refuse a layout, batch, ZeRO or precision setting that cannot work before any process is launched:
    # the workers' own start-up checks, against the input model's shape (`model_cfg`: its config)
    check_before_launch(stage, model_cfg, config.train, config.parallel, config.launch)
    if storage_for(prefix).exists(join(prefix, MANIFEST_NAME)):
        return read_manifest(prefix)
    run_id, run_dir = run_dir_for(stage, inputs, output, prefix, world)
    spec = JobSpec(stage=stage, config=config.model_dump(mode="json"), inputs=dict(inputs), output=output,
                   run_dir=run_dir, prefix=prefix, parents=dict(parents))
    if in_distributed_worker() or (config.launch.backend == "local" and world == 1):
        manifest = run_worker(spec)
        assert manifest is not None
        return manifest
    return launch_job(spec, config.launch, name=f"{stage}-{run_id}")


def export_trained(result: Any, model_cfg: ModelConfig, stage: str, tokenizer_dir: Path | None) -> Path | None:
    """Collective, on every rank after `train(..., consolidate_final=False)`: the trained weights as an HF
    Llama directory, `<scratch>/hf`, written by rank 0 a shard at a time as the ranks gather it
    (`TrainResult.gather`), so no rank holds the whole model. Rank 0 gets the scratch directory (to
    publish, then remove), the others None; a failure on any rank raises on every rank. The engine is
    released afterwards (`result.gather` is set to None)."""
    from kubellm.model.hf import export_hf
    from kubellm.training.collective import raise_if_any_failed
    from kubellm.training.runfiles import scratch_dir

    def sync(error: BaseException | None) -> None:
        raise_if_any_failed(error, "HF export", {}, RuntimeError)

    out = scratch_dir(f"kubellm-{stage}-") if result.rank == 0 else None
    try:
        export_hf(result.gather, model_cfg, out / "hf" if out is not None else None, tokenizer_dir=tokenizer_dir,
                  sync=sync if result.world_size > 1 else None)
    except BaseException:
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        # the gather holds the DeepSpeed engine: release it (and its memory, held in reference cycles)
        # now, not at some later collection in a process that may have moved on to another job
        result.gather = None
        gc.collect()
    return out


def publish_model(spec: JobSpec, out: Path, *, stage: str, model_cfg: ModelConfig, result: Any,
                  parents: dict[str, str], config_hash: str, title: str, counts: dict[str, int],
                  metrics: dict[str, float], report_lines: list[str], metadata: dict[str, Any]) -> Manifest:
    """Rank 0: publish `out` (`export_trained`'s directory, removed afterwards) with the metrics and loss
    curve as a `model`."""
    from kubellm.model.flops import num_params
    from kubellm.training.metrics import markdown_report, plot_loss_curve
    from kubellm.training.runfiles import local_work_dir, upload_run_files

    try:
        (out / "metrics").mkdir()
        src = Path(result.metrics_path)
        shutil.copy2(src, out / "metrics" / "metrics.jsonl")
        plot_loss_curve(src, out / "metrics" / "loss_curve.png", title=f"{stage} loss")
        upload_run_files(local_work_dir(spec.run_dir), spec.run_dir)
        summary = {**result.summary, **metrics}
        counts = {"steps": int(result.summary.get("steps", 0)), "parameters": num_params(model_cfg),
                  "world_size": result.world_size, **counts}
        md = "\n".join([f"## {title}", "", *report_lines, "",
                        markdown_report(result.summary, "metrics/loss_curve.png", result.peak_source,
                                        {"export": "hf/ (LlamaForCausalLM, safetensors)", "run dir": spec.run_dir})])
        return publish_dir(
            out, spec.prefix, kind="model", counts=counts, metrics=summary, config_hash=config_hash,
            parents=parents, report_markdown=md,
            metadata={"model_config": model_cfg.model_dump(mode="json"), "export_path": "hf",
                      "export_uri": join(spec.prefix, "hf"), "stage": stage, "run_dir": spec.run_dir,
                      "final_loss": result.summary.get("loss_final"), **metadata},
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
