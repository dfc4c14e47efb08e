"""The one training loop pretrain, SFT and DPO share: DeepSpeed (ZeRO 0–3) driven by an *objective*.

    from kubellm.training.engine import train
    result = train(model_cfg, train_cfg, parallel_cfg, PretrainObjective(...), run_dir="out/runs/r1")
    result.losses            # per optimizer step, averaged over micro-batches and ranks
    result.final_state_dict  # rank 0: the consolidated fp32/bf16 weights (any ZeRO stage)

Run it with one process (it sets up a 1-rank gloo group itself), under torchrun
(`torchrun --nproc-per-node 2 -m kubellm.cli launch-worker --spec job.json`), or through the stage
(`kubellm pretrain --preset debug ...`, which launches itself with `launch.nproc_per_node` processes).

Order of set-up (each step refuses impossible input before any expensive work):
  1. process group (gloo on CPU, nccl on CUDA) — `init_distributed`
  2. DeepSpeed config from the run-config (batch / layout / precision checks) — `deepspeed_config`
  3. seeding, model, activation checkpointing, AdamW param groups, LR schedule
  4. `deepspeed.initialize` (ZeRO partitions the model and optimizer here)
  5. the objective's loader for this data-parallel rank; resume from the last committed checkpoint
     (refused when it is past `train.max_steps`; the run's tokens_seen and first loss carry over)

`evaluate={"heldout": Evaluation(examples, at_start=True)}` scores examples with the objective's loss
and no update, through the same engine (so under ZeRO-3, TP or PP no rank needs the whole model): at the
end, and before the first step when `at_start`; `result.scores["start"|"end"][name]` holds the means.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from kubellm.core import faults
from kubellm.core.errors import ConfigError
from kubellm.core.storage import is_s3, join
from kubellm.model.config import ModelConfig
from kubellm.model.parallel import collective_device
from kubellm.training.config import ParallelConfig, TrainConfig
from kubellm.training.data import to_device
from kubellm.training.dsconfig import clips_in_kubellm, deepspeed_config, deepspeed_half
from kubellm.training.evaluation import Evaluation, evaluate_examples
from kubellm.training.gradients import (
    clip_gradients,
    clip_model_parallel,
    deepspeed_checks_step,
    deepspeed_grad_norm,
)
from kubellm.training.hostmem import keep_freed_memory
from kubellm.training.metrics import MetricsLogger, peak_memory_mb, peak_tflops
from kubellm.training.optim import (
    configured_hyperparameters,
    lr_lambda,
    param_groups,
    restore_hyperparameters,
    schedule_warning,
)
from kubellm.training.pipeline import PipelineBatches
from kubellm.training.pipeline import check_objective as check_pipeline_objective
from kubellm.training.process_group import init_distributed, resolve_device
from kubellm.training.relayout import consolidated_resume
from kubellm.training.runfiles import local_work_dir, restore_run_files, upload_run_files
from kubellm.training.stepguard import PipelineStepGuard, StepGuard, skip_boundary_step, skip_update
from kubellm.training.topology import ParallelModel, build_parallel_model, fill_from_dense, validate_layout

log = logging.getLogger(__name__)


# -- the objective API ---------------------------------------------------------------------------------
@runtime_checkable
class Loader(Protocol):
    """An endless iterator of micro-batches for one data-parallel rank, with an exact position."""

    def __iter__(self) -> Iterator[dict[str, Tensor]]: ...
    def __next__(self) -> dict[str, Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, sd: dict[str, Any]) -> None: ...


class Objective(Protocol):
    """What a stage plugs into the loop: its data and its loss."""

    def build_loader(self, dp_rank: int, dp_size: int, micro_batch_size: int, seed: int) -> Loader: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """(scalar loss to minimise, extra metrics to log, e.g. DPO reward accuracy)."""
        ...

    def tokens(self, batch: dict[str, Tensor]) -> int:
        """Tokens this micro-batch trains on, padding excluded (for tokens/s, tokens_seen and MFU);
        called on the host batch, before it moves to the device."""
        ...

    # Optional: `target_tokens(batch) -> int`, the loss terms in a micro-batch whose `loss` is their
    # mean (SFT: assistant tokens). Then each step's loss is the mean over every target token of the
    # step (all micro-batches, all data-parallel ranks), not a mean of per-micro-batch means, so the
    # gradient does not depend on how the global batch is split (micro-batches, accumulation, dp).


@dataclasses.dataclass
class TrainResult:
    final_state_dict: dict[str, Tensor] | None
    """Consolidated weights on rank 0 (None on other ranks; None everywhere with `consolidate_final=False`)."""
    metrics_path: Path | None
    """metrics.jsonl (rank 0; TensorBoard events are in `metrics_path.parent / "tensorboard"`)."""
    losses: list[float]
    """Loss per optimizer step of this run (resumed runs: from the resume step on)."""
    summary: dict[str, float] = dataclasses.field(default_factory=dict)
    """Headline metrics (start/final loss, tokens/s, MFU, peak memory)."""
    start_step: int = 0
    """The step training started (or resumed) at."""
    peak_source: str = ""
    """Where the MFU peak FLOP/s came from."""
    rank: int = 0
    world_size: int = 1
    gather: Callable[[Collection[str] | None], dict[str, Tensor] | None] | None = None
    """With `train(consolidate_final=False)`: collective, on every rank, the final weights' entries among
    the given dense names (all of them for None) in fp32, on rank 0 (None elsewhere), straight from the
    engine. `export_hf(result.gather, …)` writes an export a shard at a time with it, so rank 0 never holds
    the whole model. It keeps the engine alive: set it to None when done (`model_stage.export_trained`
    does)."""
    scores: dict[str, dict[str, dict[str, float]]] = dataclasses.field(default_factory=dict)
    """`Evaluation` results on every rank: `{"start": {name: {"loss": …, …}}, "end": {…}}`; "start" is
    carried in the checkpoints, so a resumed run reports the score its first attempt took."""


# -- set-up ------------------------------------------------------------------------------------------------
def train_autocast(train_cfg: TrainConfig, device: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast the training step runs under: bf16 on CPU is autocast over fp32 weights
    (DeepSpeed's bf16 mode is used on CUDA; see dsconfig). Frozen models that score alongside the
    policy (DPO's reference) use it too, cast to `weight_dtype`, so both compute in the same precision."""
    if train_cfg.precision == "bf16" and device == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def weight_dtype(train_cfg: TrainConfig, device: str) -> torch.dtype:
    """The dtype the policy's weights compute in: DeepSpeed's bf16/fp16 modes (CUDA; see dsconfig) hold
    the module in 16 bits (the optimizer keeps the fp32 masters); elsewhere fp32 (CPU bf16 is autocast
    over fp32 weights). A frozen model scoring alongside the policy (DPO's reference) is cast to it, so
    at the start, where the policy is the reference, their log-probabilities are identical."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, None: torch.float32}[deepspeed_half(train_cfg, device)]


def _token_weights(counts: list[int], accum: int, world: int, dp_size: int) -> list[float]:
    """Per-micro-batch factors that turn each micro-batch's mean loss into its share of the step's
    token mean: loss_m * n_m * dp * accum / N, N = target tokens of the whole step on every replica.
    DeepSpeed then divides by `accum` and averages gradients over the dp ranks, which leaves
    sum(token losses) / N. One all-reduce per step; TP ranks of a replica hold the same batches."""
    total = torch.tensor([float(sum(counts))], dtype=torch.float64, device=collective_device())
    if world > 1:
        dist.all_reduce(total)
    n = float(total) / (world // dp_size)
    if n <= 0:
        raise ConfigError("a training step has no target tokens on any rank (every label is ignored)")
    return [c * dp_size * accum / n for c in counts]


def _check_identity(run_dir: str, have: Any, want: Mapping[str, str] | None) -> None:
    """Refuse to resume a checkpoint trained by another stage or on other inputs (a reused run id, or
    `resume=` pointing at another run): it would publish that run's weights under these inputs."""
    if not want or not have:  # an older checkpoint records none: nothing to compare
        return
    diff = [f"{k}: checkpoint={have.get(k, '<none>')}, this run={want.get(k, '<none>')}"
            for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    if diff:
        raise ConfigError(f"{join(run_dir, 'checkpoints')}: the checkpoints in this run dir were trained by "
                          f"another stage or on other inputs ({'; '.join(diff)}); resuming them would publish "
                          "that run's weights as this one's. Train in a new run dir (another run id, or "
                          "without `resume`)")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def _checkpoint_manager(run_dir: str, keep: int, model_cfg: ModelConfig) -> Any:
    """The run's checkpoints, recording (and on resume comparing) the model config itself: a pipeline
    stage module carries no config of its own, and its parameter names cover one stage only."""
    from kubellm.training.checkpoint import CheckpointManager

    return CheckpointManager(join(run_dir, "checkpoints"), keep=keep, model_config=model_cfg)


def build_engine(model: torch.nn.Module, train_cfg: TrainConfig, ds_cfg: dict[str, Any],
                 mpu: Any = None) -> tuple[Any, Any]:
    """`deepspeed.initialize` with kubellm's AdamW param groups and warmup+cosine schedule; returns
    (engine, scheduler). With one data-parallel replica and ZeRO 0 there is nothing to average, so
    DeepSpeed's per-backward gradient all-reduce (flatten, a 1-rank collective, copy back: ~4% of a
    `debug` step on CPU) is switched off; every other layout keeps it. On CPU, freed host memory is
    kept for reuse (`train.host_memory_reuse`, `kubellm.training.hostmem`)."""
    import deepspeed

    if train_cfg.host_memory_reuse and resolve_device(train_cfg.device) == "cpu":
        keep_freed_memory()
    schedule = lr_lambda(train_cfg.optim, train_cfg.max_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, train_cfg.optim), config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule), mpu=mpu)
    if engine.dp_world_size == 1 and not engine.zero_optimization() and not engine.pipeline_parallelism:
        engine.enable_backward_allreduce = False
    return engine, scheduler


# -- the loop ----------------------------------------------------------------------------------------------
def train(model_cfg: ModelConfig, train_cfg: TrainConfig, parallel_cfg: ParallelConfig,
          objective: Objective, run_dir: str, init_state_dict: Mapping[str, Tensor] | None = None,
          resume: bool = True, identity: Mapping[str, str] | None = None,
          evaluate: Mapping[str, Evaluation] | None = None, consolidate_final: bool = True) -> TrainResult:
    """Train `objective` for `train_cfg.max_steps` optimizer steps; see the module docstring.

    `identity` (the stage and its inputs' digests, `JobSpec.identity`) is saved with every checkpoint;
    a checkpoint recorded with another identity is refused rather than resumed. `consolidate_final=False`
    skips gathering the whole model onto rank 0 at the end (`final_state_dict` is None): the stages export
    through `result.gather` instead, a shard at a time."""
    from kubellm.model import Transformer, check_token_ids
    from kubellm.model.flops import flops_per_token

    device = resolve_device(train_cfg.device)
    rank, world = init_distributed(device)
    # dp × tp × pp against the world size and the model (numbers in the message); dp resolved
    parallel_cfg = validate_layout(model_cfg, train_cfg, parallel_cfg, world)
    ds_cfg = deepspeed_config(train_cfg, parallel_cfg, world, device, model_cfg)
    accum = ds_cfg["gradient_accumulation_steps"]
    if train_cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"train.seq_len={train_cfg.seq_len} exceeds model max_seq_len="
                          f"{model_cfg.max_seq_len}; lower train.seq_len or raise model.overrides.max_seq_len")

    seed_everything(train_cfg.seed, train_cfg.deterministic)
    # a checkpoint saved with another tp/pp resumes from its consolidated weights (kubellm.training.relayout)
    relayout = consolidated_resume(run_dir, model_cfg, parallel_cfg) if resume else None
    if relayout is not None:
        init_state_dict = relayout.state_dict
    built: ParallelModel | None = None
    model: torch.nn.Module
    if parallel_cfg.tp > 1 or parallel_cfg.pp > 1:
        # TP layers / PipelineModule, sharded from the same dense init (kubellm.training.topology)
        if parallel_cfg.pp > 1:
            check_pipeline_objective(objective)
        built = build_parallel_model(model_cfg, train_cfg, parallel_cfg, init_state_dict, device)
        model = built.module
    else:
        # same seed on every rank -> identical initial weights, built where it trains (a GPU model
        # never passes through host memory); given weights are copied in tensor by tensor
        dense = Transformer(model_cfg, device=device, init=init_state_dict is None)
        if init_state_dict is not None:
            fill_from_dense(dense, model_cfg, 0, 1, init_state_dict, device)
        dense.set_activation_checkpointing(train_cfg.activation_checkpointing)
        if train_cfg.compile:
            dense.compile()  # in place: the state dict, checkpoints and export keep their names
        model = dense
    # filled: the initial weights (a relayout's memory-mapped checkpoint shards) are not needed past here
    init_state_dict = None
    if relayout is not None:
        relayout = dataclasses.replace(relayout, state_dict={})
    if device == "cuda":
        model = model.cuda()
    engine, scheduler = build_engine(model, train_cfg, ds_cfg,
                                     mpu=built.mpu if built is not None else None)  # TP groups; PP brings its grid
    autocast = train_autocast(train_cfg, device)

    # every TP rank / pipeline stage of one data-parallel replica reads the same micro-batches
    dp_rank, dp_size = (built.dp_rank, built.dp_size) if built is not None else (rank, world)
    loader = objective.build_loader(dp_rank, dp_size, train_cfg.micro_batch_size, train_cfg.seed)
    pipe_batches = PipelineBatches(loader, objective.tokens) if built is not None and built.pipeline else None
    ds_checks = deepspeed_checks_step(engine, train_cfg.zero_stage)
    own_clip = clips_in_kubellm(train_cfg, parallel_cfg, device)
    if own_clip == ds_checks:  # exactly one of kubellm and DeepSpeed clips (and checks the norm)
        raise AssertionError(f"kubellm clips: {own_clip}, DeepSpeed checks the step: {ds_checks}; the two must differ")
    ckpt = _checkpoint_manager(run_dir, train_cfg.keep_checkpoints, model_cfg)
    # NaN/Inf and loss-spike policy (kubellm.training.stepguard): decided identically on every rank
    guard = StepGuard(train_cfg.nonfinite, train_cfg.spike_sigma, train_cfg.spike_window, world)
    pipe_guard = (PipelineStepGuard(engine, guard, train_cfg.zero_stage, built.tp_rank, built.dp_size,
                                    train_cfg.optim.grad_clip if own_clip else 0.0)
                  if pipe_batches is not None and built is not None else None)
    start_step = 0
    # run totals carried across a resume, so the summary covers the whole run, not the resumed part
    tokens_seen = 0.0
    loss_start: float | None = None  # the first logged step's loss
    loss_last: float | None = None
    client_state: dict[str, Any] | None = None
    if resume:
        configured = configured_hyperparameters(scheduler)
        client_state = relayout.apply(scheduler) if relayout is not None else ckpt.load(engine)
        if client_state:
            start_step = int(client_state["step"])
            # the load restored the saved lr/betas/eps/weight decay: this run's train.optim applies
            changes = restore_hyperparameters(scheduler, configured)
            if changes and rank == 0:
                log.warning("resuming at step %d with train.optim changed since the checkpoint (%s): the "
                            "configured values apply from step %d; AdamW's moments and the schedule's "
                            "position carry over", start_step, ", ".join(changes), start_step + 1)
            _check_identity(run_dir, client_state.get("identity"), identity)
            if start_step > train_cfg.max_steps:
                raise ConfigError(
                    f"{join(run_dir, 'checkpoints')}: checkpoint at step {start_step} > train.max_steps="
                    f"{train_cfg.max_steps}: this run was already trained past the configured length, and "
                    f"publishing it under this config would mislabel it; set train.max_steps ≥ {start_step} "
                    "to continue it, or train in a new run dir (without `resume`, or another run id)")
            loader.load_state_dict(client_state["loader"])
            if "guard" in client_state:  # spike window + skip counts: a resumed run decides the same
                guard.load_state_dict(client_state["guard"])
            if "tokens_seen" in client_state:
                tokens_seen = float(client_state["tokens_seen"])
                loss_start, loss_last = client_state.get("loss_start"), client_state.get("loss_last")
            elif rank == 0:
                log.warning("the checkpoint at step %d records no tokens_seen (written by an older kubellm): "
                            "tokens_seen counts from the resume", start_step)
            if rank == 0:
                log.info("resumed from the checkpoint at step %d", start_step)
    evaluate = dict(evaluate or {})
    scores: dict[str, dict[str, dict[str, float]]] = {"start": {}, "end": {}}
    at_start = [name for name, ev in evaluate.items() if ev.at_start]
    if at_start and start_step:  # the first attempt scored the starting weights: those are gone now
        saved = client_state.get("scores_start") if client_state else None
        scores["start"] = {k: dict(v) for k, v in (saved or {}).items() if k in at_start}
        if rank == 0 and (lost := sorted(set(at_start) - set(scores["start"]))):
            log.warning("the checkpoint at step %d records no start-of-run score of %s (written by an older "
                        "kubellm, or with other evaluations): it is left out of the results", start_step, lost)
    elif at_start:
        scores["start"] = {name: evaluate_examples(engine, objective, evaluate[name].examples, train_cfg.micro_batch_size,
                                           built, device, autocast) for name in at_start}
    if rank == 0 and (warning := schedule_warning(train_cfg.optim, train_cfg.max_steps)):
        log.warning("%s", warning)

    work = local_work_dir(run_dir)
    if rank == 0 and start_step:
        try:
            restore_run_files(run_dir, work)  # a resume on another pod: the log of the steps before it
        except Exception as e:  # a log copy: the run resumes without it (its totals come from the checkpoint)
            log.warning("could not fetch the earlier metrics from %s: %s", run_dir, e)
    peak, peak_source = peak_tflops(device, train_cfg.peak_tflops)
    fpt = flops_per_token(model_cfg, train_cfg.seq_len)
    logger = MetricsLogger(work, train_cfg.max_steps, enabled=rank == 0, tensorboard=train_cfg.tensorboard,
                           progress_bar=train_cfg.progress_bar, initial_step=start_step)
    losses: list[float] = []
    checked = False
    target_tokens = getattr(objective, "target_tokens", None)
    try:
        for step in range(start_step, train_cfg.max_steps):
            faults.maybe_kill(step + 1, rank)  # no-op unless KUBELLM_FAULT_KILL_AT_STEP is set (tests)
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64)
            extra: dict[str, Tensor] = {}
            n_tokens = 0
            grad_norm = 0.0
            skipped: str | None = None
            skips_before = int(getattr(engine, "skipped_steps", 0))
            lr = float(scheduler.get_last_lr()[0])  # the lr this step's update uses (the scheduler steps after it)
            step_batches: list[dict[str, Tensor]] = []
            weights: list[float] | None = None
            if target_tokens is not None or pipe_batches is not None:
                step_batches = [next(loader) for _ in range(accum)]
                if target_tokens is not None:
                    weights = _token_weights([target_tokens(b) for b in step_batches], accum, world, dp_size)
            if pipe_batches is not None and pipe_guard is not None:
                # pipeline: DeepSpeed runs the accum micro-batches itself; every rank of the replica
                # read the same ones above (first and last stage feed them, with their token weights)
                if not checked:
                    check_token_ids(step_batches[0]["input_ids"], model_cfg.vocab_size, where="training batch")
                    checked = True
                pipe_batches.feed(step_batches, weights)
                step_batches = []
                before = pipe_batches.tokens
                pipe_guard.begin(step + 1)
                with autocast:
                    loss_sum += float(engine.train_batch(data_iter=pipe_batches)) * accum
                n_tokens = pipe_batches.tokens - before
                skipped, grad_norm = pipe_guard.verdict, pipe_guard.grad_norm
            for micro in range(0 if pipe_batches is not None else accum):
                batch = step_batches[micro] if step_batches else next(loader)
                if not checked:
                    check_token_ids(batch["input_ids"], model_cfg.vocab_size, where="training batch")
                    checked = True
                n_tokens += objective.tokens(batch)  # on the host batch: no device sync
                batch = to_device(batch, device)
                with autocast:
                    loss, metrics = objective.loss(engine, batch)
                if weights is not None:
                    loss = loss * weights[micro]
                loss_sum += loss.detach().double().cpu()
                if micro == accum - 1:
                    # before the boundary's backward: every rank sees a NaN/Inf or spiking step loss
                    # (one all-reduce) and takes the same branch; "stop" raises here, before any update
                    skipped = guard.check_loss(loss_sum / accum, step + 1)
                if skipped:
                    skip_update(engine, loss, train_cfg.zero_stage)
                else:
                    engine.backward(loss)  # DeepSpeed divides by `accum` itself
                    if micro == accum - 1 and own_clip:
                        # ZeRO 0: the all-reduced grads' norm, before kubellm clips them (DeepSpeed's
                        # gradient_clipping is 0); with TP one global norm, so every rank takes the same branch
                        grad_norm = (clip_gradients(engine, train_cfg.optim.grad_clip) if built is None
                                     else clip_model_parallel(engine, built.tp_rank, dp_size, train_cfg.optim.grad_clip))
                        skipped = guard.check_grad_norm(grad_norm, step + 1)  # same on every rank
                    if skipped:
                        skip_boundary_step(engine)
                    else:
                        engine.step()
                for k, v in metrics.items():
                    extra[k] = extra.get(k, 0.0) + v.detach().double().cpu() / accum
            if ds_checks:  # DeepSpeed computed the norm (and skipped a non-finite step) in step()
                grad_norm = deepspeed_grad_norm(engine)
                if not skipped and (int(getattr(engine, "skipped_steps", 0)) > skips_before
                                    or not math.isfinite(grad_norm)):
                    fp16 = bool(engine.fp16_enabled())  # the loss scaler's overflow: counted, routine
                    guard.note_deepspeed_skip(step + 1, fp16)  # DeepSpeed's own non-finite grad-norm skip
                    skipped = "overflow" if fp16 else "nonfinite"
            # average loss/metrics over ranks, sum tokens (one small all-reduce per step)
            keys = sorted(extra)
            if built is not None and not built.feeds_data:
                n_tokens = 0  # TP ranks and later stages see the same tokens as their replica's first rank
            stats = torch.tensor([float(loss_sum) / accum, float(n_tokens), *[float(extra[k]) for k in keys]],
                                 dtype=torch.float64, device=collective_device())
            if world > 1:
                dist.all_reduce(stats)
            step_loss = float(stats[0]) / world
            global_tokens = float(stats[1])
            tokens_seen += global_tokens
            losses.append(step_loss)
            if not skipped:
                guard.accept(step_loss)
            dt = time.perf_counter() - t0
            values = {"loss": step_loss, "grad_norm": grad_norm, "lr": lr,
                      "tokens_per_s": global_tokens / dt, "step_time_s": dt, "tokens_seen": tokens_seen,
                      "peak_memory_mb": peak_memory_mb(device)}
            values.update({k: float(stats[2 + i]) / world for i, k in enumerate(keys)})
            if peak:
                values["mfu"] = fpt * values["tokens_per_s"] / (peak * 1e12 * world)
            values.update(skipped=float(bool(skipped)), **guard.metrics())
            if (step + 1) % train_cfg.log_every == 0 or step + 1 == train_cfg.max_steps:
                logger.log(step + 1, values)
                loss_start = step_loss if loss_start is None else loss_start
                loss_last = step_loss
            last = step + 1 == train_cfg.max_steps
            every = train_cfg.checkpoint_every
            if last or (every and (step + 1) % every == 0):
                ckpt.save(engine, step + 1, {"step": step + 1, "loader": loader.state_dict(),
                                             "guard": guard.state_dict(), "tokens_seen": tokens_seen,
                                             "loss_start": loss_start, "loss_last": loss_last,
                                             "lr_steps": int(scheduler.last_epoch),  # applied steps
                                             "identity": dict(identity or {}),
                                             "scores_start": scores["start"]})
                if rank == 0 and is_s3(run_dir):  # the log up to this checkpoint, for a resume elsewhere
                    logger.flush()
                    try:
                        upload_run_files(work, run_dir)
                    except Exception as e:  # a log copy: never worth failing a committed step over
                        log.warning("could not copy the metrics to %s (the next checkpoint or the publish "
                                    "retries): %s", run_dir, e)
    finally:
        logger.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()

    scores["end"] = {name: evaluate_examples(engine, objective, ev.examples, train_cfg.micro_batch_size, built, device,
                                     autocast) for name, ev in evaluate.items()}
    from kubellm.training.consolidate import consolidated_state_dict

    def gather(names: Collection[str] | None = None) -> dict[str, Tensor] | None:
        # fp32 (master weights), any ZeRO stage
        return built.consolidate(engine, names) if built is not None else consolidated_state_dict(engine, names)

    final = gather() if consolidate_final else None
    summary = {**logger.summary(), **guard.metrics()}
    if rank == 0 and start_step:
        # rank 0's metrics.jsonl of the part before the resume may be gone (a new node, an S3 run dir)
        # and a run resumed from its final checkpoint logs no step at all: the checkpoint's totals hold
        summary["tokens_seen"] = tokens_seen
        summary.setdefault("steps", float(train_cfg.max_steps))
        if loss_start is not None:
            summary["loss_start"] = float(loss_start)
        if loss_last is not None:
            summary.setdefault("loss_final", float(loss_last))
    if world > 1:
        dist.barrier()
    return TrainResult(final_state_dict=final, gather=None if consolidate_final else gather, metrics_path=logger.path if rank == 0 else None, losses=losses,
                       summary=summary, start_step=start_step, peak_source=peak_source, rank=rank,
                       world_size=world, scores=scores)


