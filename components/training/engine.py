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
import datetime
import logging
import math
import os
import random
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from kubellm.core import faults
from kubellm.core.errors import ConfigError
from kubellm.core.storage import is_s3, join, local_path, storage_for
from kubellm.model.config import ModelConfig
from kubellm.model.parallel import collective_device
from kubellm.training.collective import raise_if_any_failed
from kubellm.training.config import ParallelConfig, TrainConfig
from kubellm.training.dsconfig import clips_in_kubellm, deepspeed_config, deepspeed_half
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
from kubellm.training.relayout import consolidated_resume
from kubellm.training.stepguard import (
    StepGuard,
    optimizer_step_skipped,
    poison_gradients,
    skip_boundary_step,
    skip_update,
)
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
    """Consolidated weights on rank 0 (None on other ranks)."""
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
    scores: dict[str, dict[str, dict[str, float]]] = dataclasses.field(default_factory=dict)
    """`Evaluation` results on every rank: `{"start": {name: {"loss": …, …}}, "end": {…}}`; "start" is
    carried in the checkpoints, so a resumed run reports the score its first attempt took."""


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Examples (the objective's fixed-shape arrays, as its loader reads them) that `train` scores with the
    objective's loss, without an update: after the last step, and before the first when `at_start`.

    Each data-parallel replica scores every dp-th micro-batch of them on the training device, in the
    training precision, through the engine (ZeRO-3 gathers its parameters, TP ranks compute their
    shards, a pipeline runs DeepSpeed's inference schedule). The loss and the objective's metrics are
    means weighted by the objective's `target_tokens` (SFT: over every assistant token), else by
    example (DPO: over pairs)."""

    examples: Sequence[dict[str, np.ndarray]]
    at_start: bool = False


# -- process group ---------------------------------------------------------------------------------------
def resolve_device(choice: str) -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use auto or cpu")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_SELF_MADE = "KUBELLM_SINGLE_PROCESS_GROUP"


def in_distributed_worker() -> bool:
    """True inside a torchrun / PyTorchJob worker (the launcher set RANK and WORLD_SIZE)."""
    # init_distributed gives a plain `python` process a 1-rank group and marks it `<pid>:<port>`.
    # Those variables stay in os.environ (DeepSpeed reads LOCAL_RANK while it builds engines), so child
    # processes inherit them: in the process that made the group, or in a child while MASTER_PORT is
    # still that port, they describe that group, not a launcher's (a launcher sets a port of its own).
    pid, _, port = os.environ.get(_SELF_MADE, "").partition(":")
    self_made = bool(port) and (pid == str(os.getpid()) or port == os.environ.get("MASTER_PORT"))
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and not self_made


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Join (or, alone, create) the process group; returns (rank, world_size)."""
    if not dist.is_initialized():
        if not in_distributed_worker():
            # a plain `python` process: a 1-rank group so the same DeepSpeed path runs everywhere
            port = str(_free_port())
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", _SELF_MADE: f"{os.getpid()}:{port}",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        import deepspeed

        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", timeout=pg_timeout())
    return dist.get_rank(), dist.get_world_size()


def pg_timeout() -> datetime.timedelta:
    """The process-group timeout: KUBELLM_PG_TIMEOUT_S (the PyTorchJob's `pg_timeout_s`), else 600 s. A
    collective waiting on a lost peer fails after it instead of hanging the other ranks."""
    raw = os.environ.get("KUBELLM_PG_TIMEOUT_S", "600")
    try:
        seconds = float(raw)
    except ValueError:
        raise ConfigError(f"KUBELLM_PG_TIMEOUT_S={raw!r}: expected a number of seconds") from None
    if seconds <= 0:
        raise ConfigError(f"KUBELLM_PG_TIMEOUT_S={raw!r}: expected a number of seconds > 0")
    return datetime.timedelta(seconds=seconds)


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


def local_work_dir(run_dir: str) -> Path:
    """Where rank 0 writes metrics: the run dir itself when local, else a node-local directory."""
    if not is_s3(run_dir):
        return local_path(run_dir)
    base = Path(os.environ.get("KUBELLM_CACHE_DIR", Path.home() / ".cache" / "kubellm"))
    return base / "runs" / run_dir.replace("s3://", "").replace("/", "_")


def _checkpoint_manager(run_dir: str, keep: int, model_cfg: ModelConfig) -> Any:
    """The run's checkpoints, recording (and on resume comparing) the model config itself: a pipeline
    stage module carries no config of its own, and its parameter names cover one stage only."""
    from kubellm.training.checkpoint import CheckpointManager

    return CheckpointManager(join(run_dir, "checkpoints"), keep=keep, model_config=model_cfg)


def _grad_norm(engine: Any) -> float:
    """Global gradient norm before clipping, as DeepSpeed's optimizer recorded it in the last `step()`
    (ZeRO ≥ 1, bf16/fp16 wrappers: `deepspeed_checks_step`); where it records none, a norm of this
    rank's .grad tensors (plain ZeRO 0 uses `clip_gradients` / `model_parallel_grad_norm` instead)."""
    norm = engine.get_global_grad_norm()
    if norm is not None:
        return float(norm)
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def model_parallel_grad_norm(engine: Any, tp_rank: int, dp_size: int) -> float:
    """ZeRO 0 with TP and/or PP: the global norm of the (already data-parallel-reduced) gradients,
    the same number on every rank. Each rank sums the squares of its own gradients, counting a
    TP-sharded parameter (`tensor_model_parallel`) on every TP rank, a replicated one (norms) on TP
    rank 0 only, and a pipeline-tied copy (`ds_pipe_replicated`, the embedding on the last stage)
    not at all; one all-reduce over every rank then adds the stages, TP ranks and the dp replicas
    (which hold identical gradients, hence the division by dp)."""
    sq = torch.zeros(1, dtype=torch.float64, device=collective_device())
    for p in engine.module.parameters():
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue
        if tp_rank != 0 and not getattr(p, "tensor_model_parallel", False):
            continue
        sq += torch.linalg.vector_norm(p.grad.detach().float()).double() ** 2
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    return math.sqrt(float(sq[0]) / dp_size)


def deepspeed_checks_step(engine: Any, zero_stage: int) -> bool:
    """Whether DeepSpeed's own optimizer wrapper computes the gradient norm and skips a non-finite
    step inside `step()`: ZeRO ≥ 1, and DeepSpeed's bf16/fp16 modes (CUDA). The norm is then read
    after `step()` (before it, `get_global_grad_norm` still holds the previous step's value)."""
    return zero_stage > 0 or bool(engine.bfloat16_enabled()) or bool(engine.fp16_enabled())


class PipelineStepGuard:
    """pp > 1: the StepGuard inside DeepSpeed's `train_batch`, before its update is applied.

    DeepSpeed's pipeline schedule ends every step with ReduceTiedGrads, ReduceGrads, OptimizerStep
    on every stage; this swaps two of those instructions (on this engine instance only):
    * ReduceTiedGrads: all forwards and backwards are done, the last stage holds the step's loss.
      It is broadcast over the pipe group and `guard.check_loss` runs on every rank (same verdict);
      "stop" raises here. To skip with ZeRO ≥ 1 the local gradients are made non-finite before they
      are reduced, so ZeRO's overflow path skips the update (as `skip_update` does without pp).
    * OptimizerStep: with ZeRO 0 (no DeepSpeed bf16/fp16 wrapper) the gradients are reduced over dp
      and tied copies; their global norm (`model_parallel_grad_norm`) goes to `check_grad_norm` and
      clips every stage's gradients (`grad_clip`, `clip_model_parallel`; DeepSpeed's own clip would use the
      first stage's norm), and a skipped step runs the optimizer step as a no-op
      (`optimizer_step_skipped`: LR schedule held).
    """

    def __init__(self, engine: Any, guard: StepGuard, zero_stage: int, tp_rank: int, dp_size: int,
                 grad_clip: float = 0.0) -> None:
        from deepspeed.runtime.pipe import schedule

        self.engine, self.guard, self.zero_stage, self.grad_clip = engine, guard, zero_stage, grad_clip
        self.tp_rank, self.dp_size = tp_rank, dp_size
        self.own_norm = not deepspeed_checks_step(engine, zero_stage)
        self.step = 0
        self.verdict: str | None = None
        self.grad_norm = 0.0
        table = dict(type(engine)._INSTRUCTION_MAP)
        real_tied, real_opt = table[schedule.ReduceTiedGrads], table[schedule.OptimizerStep]
        me = self

        def reduce_tied_grads(eng: Any, **kw: Any) -> None:
            me._check_loss()
            real_tied(eng, **kw)

        def optimizer_step(eng: Any, **kw: Any) -> None:
            if me.own_norm and not me.verdict:
                me.grad_norm = clip_model_parallel(eng, me.tp_rank, me.dp_size, me.grad_clip)
                me.verdict = me.guard.check_grad_norm(me.grad_norm, me.step)
            if me.verdict and me.zero_stage == 0:
                with optimizer_step_skipped(eng.optimizer):
                    real_opt(eng, **kw)
            else:
                real_opt(eng, **kw)

        table[schedule.ReduceTiedGrads] = reduce_tied_grads
        table[schedule.OptimizerStep] = optimizer_step
        engine._INSTRUCTION_MAP = table  # the instance's map; PipelineEngine binds each entry to itself

    def begin(self, step: int) -> None:
        self.step, self.verdict, self.grad_norm = step, None, 0.0

    def _check_loss(self) -> None:
        eng = self.engine
        loss = torch.zeros(1, dtype=torch.float64, device=collective_device())
        if eng.is_last_stage():
            loss[0] = float(eng.total_loss) / eng.gradient_accumulation_steps()
        if eng.num_stages > 1:
            src = eng.grid.stage_to_global(eng.num_stages - 1)
            dist.broadcast(loss, src=src, group=eng.grid.get_pipe_parallel_group())
        self.verdict = self.guard.check_loss(loss, self.step)  # collective; "stop" raises
        if self.verdict and self.zero_stage > 0:
            poison_gradients(eng)


def _to_device(batch: dict[str, Tensor], device: str) -> dict[str, Tensor]:
    if device == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _evaluate(engine: Any, objective: Objective, examples: Sequence[dict[str, np.ndarray]], micro: int,
              built: ParallelModel | None, device: str, autocast: contextlib.AbstractContextManager[Any]
              ) -> dict[str, float]:
    """Weighted means of the objective's loss and metrics over `examples` (see `Evaluation`); collective:
    every rank of the job calls it. Every replica runs as many forward passes (a replica short of
    micro-batches repeats one with weight 0), as ZeRO-3's parameter gathers and TP's collectives need."""
    from kubellm.sft.data import IGNORE

    pipeline = built is not None and built.pipeline
    dp_rank, dp_size = (built.dp_rank, built.dp_size) if built is not None else (dist.get_rank(), dist.get_world_size())

    def batch(i: int) -> dict[str, Tensor]:  # micro-batch i, stacked when it is needed (not all at once)
        rows = examples[i * micro : (i + 1) * micro]
        return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}

    n = -(-len(examples) // micro)
    weigh = getattr(objective, "target_tokens", None)
    weights = [float(weigh(batch(i))) if weigh is not None else float(len(examples[i * micro : (i + 1) * micro]))
               for i in range(n)]  # the same on every rank
    total = sum(weights)
    if total == 0:
        return {}
    per = -(-n // dp_size)
    mine = [(batch(i), weights[i]) for i in range(dp_rank, n, dp_size)]
    mine += [(batch(0), 0.0)] * (per - len(mine))
    if pipeline:
        # the pipeline sends activations of one shape: a short last micro-batch gets rows whose labels
        # are all ignored (the causal-LM loss is a mean over labelled tokens, which they leave as it is)
        def full(b: dict[str, Tensor]) -> dict[str, Tensor]:
            short = micro - b["input_ids"].shape[0]
            if not short:
                return b
            pad = {k: v[:1].expand(short, *v.shape[1:]) for k, v in b.items()}
            pad["labels"] = torch.full_like(pad["labels"], IGNORE)
            return {k: torch.cat([v, pad[k]]) for k, v in b.items()}

        feed = PipelineBatches(iter(()), objective.tokens)
        feed.feed([full(b) for b, _ in mine], [w for _, w in mine])  # each loss times its weight
        with autocast:
            out = engine.eval_batch(data_iter=feed, num_micro_batches=per)  # mean over micro-batches and dp
        return {"loss": float(out) * per * dp_size / total}
    sums: dict[str, float] = {}
    error: BaseException | None = None
    engine.eval()
    try:
        with torch.no_grad():
            for b, w in mine:
                with autocast:
                    loss, metrics = objective.loss(engine, _to_device(b, device))
                for k, v in {"loss": loss, **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + (float(v) * w if w else 0.0)
    except Exception as e:  # noqa: BLE001 - raised on every rank below, after the peers have heard of it
        error = e
    finally:
        engine.train()
    # a rank that failed (out of memory on its share) fails every rank here, not after a timeout in the
    # all-reduce (ZeRO 0-2 forwards run no collective of their own; ZeRO-3/TP ones would still wait)
    raise_if_any_failed(error, "held-out scoring", {}, RuntimeError)
    keys = sorted(sums)
    counts = built is None or built.tp_rank == 0  # a replica's TP ranks compute the same values
    reduced = torch.tensor([sums[k] if counts else 0.0 for k in keys], dtype=torch.float64,
                           device=collective_device())
    if dist.get_world_size() > 1:
        dist.all_reduce(reduced)
    return {k: float(reduced[i]) / total for i, k in enumerate(keys)}


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


def clip_model_parallel(engine: Any, tp_rank: int, dp_size: int, max_norm: float) -> float:
    """ZeRO 0 with TP and/or PP: the global gradient norm over every rank (`model_parallel_grad_norm`,
    returned before clipping), and this rank's .grad clipped by it with torch's `clip_grads_with_norm_`
    (the factor `clip_grad_norm_` applies, the same on every rank). No clipping when `max_norm` ≤ 0 or
    the norm is not finite (the step guard skips that step)."""
    norm = model_parallel_grad_norm(engine, tp_rank, dp_size)
    if max_norm <= 0 or not math.isfinite(norm):
        return norm
    params = [p for p in engine.module.parameters() if p.grad is not None]
    if params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(norm, dtype=torch.float64), foreach=True)
    return norm


def clip_gradients(engine: Any, max_norm: float) -> float:
    """Global gradient norm of the module's .grad (before clipping), clipped to `max_norm` when > 0:
    torch's foreach kernels, one norm for both the clip and the logged value. Used where
    `dsconfig.clips_in_kubellm` holds without TP/PP (DeepSpeed's gradient_clipping is 0 there)."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True))


# -- the loop ----------------------------------------------------------------------------------------------
def train(model_cfg: ModelConfig, train_cfg: TrainConfig, parallel_cfg: ParallelConfig,
          objective: Objective, run_dir: str, init_state_dict: Mapping[str, Tensor] | None = None,
          resume: bool = True, identity: Mapping[str, str] | None = None,
          evaluate: Mapping[str, Evaluation] | None = None) -> TrainResult:
    """Train `objective` for `train_cfg.max_steps` optimizer steps; see the module docstring.

    `identity` (the stage and its inputs' digests, `JobSpec.identity`) is saved with every checkpoint;
    a checkpoint recorded with another identity is refused rather than resumed."""
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
        scores["start"] = {name: _evaluate(engine, objective, evaluate[name].examples, train_cfg.micro_batch_size,
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
                batch = _to_device(batch, device)
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
                grad_norm = _grad_norm(engine)
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

    scores["end"] = {name: _evaluate(engine, objective, ev.examples, train_cfg.micro_batch_size, built, device,
                                     autocast) for name, ev in evaluate.items()}
    from kubellm.training.checkpoint import consolidated_state_dict

    final = (built.consolidate(engine) if built is not None
             else consolidated_state_dict(engine))  # fp32 (master weights), any ZeRO stage
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
    return TrainResult(final_state_dict=final, metrics_path=logger.path if rank == 0 else None, losses=losses,
                       summary=summary, start_step=start_step, peak_source=peak_source, rank=rank,
                       world_size=world, scores=scores)


def upload_run_files(work: Path, run_dir: str) -> None:
    """Copy rank 0's metrics (JSONL, TensorBoard) to an S3 run dir (no-op for a local run dir)."""
    if not is_s3(run_dir):
        return
    st = storage_for(run_dir)
    for p in sorted(work.rglob("*")):
        if p.is_file():
            st.upload(p, join(run_dir, p.relative_to(work).as_posix()))


def restore_run_files(run_dir: str, work: Path) -> None:
    """Before a resume, fetch an S3 run dir's metrics (JSONL, TensorBoard; uploaded at every checkpoint)
    into rank 0's node-local `work` dir when it has none: a resume on another pod then keeps the earlier
    steps' rows instead of publishing a log that starts at the resume."""
    if not is_s3(run_dir) or (work / "metrics.jsonl").exists():
        return
    st = storage_for(run_dir)
    work.mkdir(parents=True, exist_ok=True)
    if st.exists(uri := join(run_dir, "metrics.jsonl")):
        st.download(uri, work / "metrics.jsonl")
    for o in st.list(join(run_dir, "tensorboard")):
        dest = work / "tensorboard" / o.relpath
        dest.parent.mkdir(parents=True, exist_ok=True)
        st.download(o.uri, dest)


def scratch_dir(prefix: str = "kubellm-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
