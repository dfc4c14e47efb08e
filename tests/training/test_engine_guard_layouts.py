"""The step guard and the gradient norm in every layout: TP and PP runs log the 1-process gradient
norm and take the same skip/stop decisions on every rank; the pipeline skips a bad step before
DeepSpeed applies it and weights SFT micro-batches by their target tokens; DeepSpeed's bf16 wrapper
(the CUDA path, built on CPU) is read after its step; a relayout resume keeps the LR of skipped
steps; the spawn harness returns results larger than a pipe buffer.

    .venv/bin/python -m pytest tests/training/test_engine_guard_layouts.py -q
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from kubellm.training.spawn import spawn

SEQ, VOCAB = 32, 256


def _shards(root: Path) -> list[str]:
    from shardkit import make_shards

    return make_shards(root, VOCAB, 200, 0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return _shards(tmp_path_factory.mktemp("guard-shards"))


def _model() -> Any:
    from kubellm.model.config import get_preset

    return get_preset("debug").with_(vocab_size=VOCAB, max_seq_len=64, dim=32, n_layers=4, ffn_dim=64)


def _train_cfg(**kw: Any) -> Any:
    from kubellm.training.config import OptimConfig, TrainConfig

    base: dict[str, Any] = dict(max_steps=3, micro_batch_size=2, global_batch_size=8, seq_len=SEQ,
                                progress_bar=False, tensorboard=False, device="cpu",
                                optim=OptimConfig(lr=3e-3, warmup_steps=2, grad_clip=1.0))
    base.update(kw)
    return TrainConfig(**base)


def _rows(result: Any) -> dict[int, dict[str, float]]:
    if result.metrics_path is None:
        return {}
    rows = [json.loads(x) for x in Path(result.metrics_path).read_text().splitlines() if x.strip()]
    return {int(r["step"]): r for r in rows}


def _faulty(factor: dict[int, Any], accum: int, fn: Any) -> Any:
    """fn(*args) whose result is multiplied by factor[step] (step = call // accum + 1), or passed
    through it when it is a function."""
    calls = [0]

    def wrapped(*args: Any, **kw: Any) -> Any:
        step = calls[0] // accum + 1
        calls[0] += 1
        out = fn(*args, **kw)
        if step not in factor:
            return out
        return factor[step](out) if callable(factor[step]) else out * factor[step]

    return wrapped


class _FaultyObjective:
    """PretrainObjective whose loss is scaled at given steps (NaN, a spike), 1-process reference."""

    def __init__(self, shards: list[str], factor: dict[int, Any], accum: int) -> None:
        from kubellm.pretrain.objective import PretrainObjective

        self.inner = PretrainObjective(shards, seq_len=SEQ, vocab_size=VOCAB)
        self.build_loader, self.tokens = self.inner.build_loader, self.inner.tokens
        self._loss = _faulty(factor, accum, lambda m, b: self.inner.loss(m, b)[0])

    def loss(self, model: Any, batch: Any) -> Any:
        return self._loss(model, batch), {}


def run_layout(shards: list[str], run_dir: str, layout: dict[str, int], train_kw: dict[str, Any],
               factor: dict[int, float] | None = None, init_nan: bool = False, resume: bool = False) -> dict[str, Any]:
    """spawn() target: train; with pp the pipeline's loss function is the faulty one, else the objective's."""
    import torch

    import kubellm.training.pipeline as pipeline
    from kubellm.model import Transformer
    from kubellm.pretrain.objective import PretrainObjective
    from kubellm.training.config import ParallelConfig
    from kubellm.training.engine import train

    tc = _train_cfg(**train_kw)
    accum = tc.global_batch_size // tc.micro_batch_size  # dp = 1 in every layout here
    obj: Any = PretrainObjective(shards, seq_len=SEQ, vocab_size=VOCAB)
    if factor and layout.get("pp", 1) > 1:
        pipeline.pipeline_loss = _faulty(factor, accum, pipeline.pipeline_loss)  # type: ignore[assignment]
    elif factor:
        obj = _FaultyObjective(shards, factor, accum)
    sd = None
    if init_nan:  # every loss is NaN
        torch.manual_seed(0)
        sd = Transformer(_model()).state_dict()
        sd["norm.weight"] = torch.full_like(sd["norm.weight"], float("nan"))
    try:
        r = train(_model(), tc, ParallelConfig(**layout), obj, run_dir, init_state_dict=sd, resume=resume)
    except FloatingPointError as e:
        return {"error": str(e)}
    return {"losses": r.losses, "rows": _rows(r), "summary": r.summary, "start": r.start_step}


def _close(a: list[float], b: list[float], rel: float = 1e-4) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=rel, abs=1e-6)
                                    for x, y in zip(a, b, strict=True))


# -- 1 and 2: one global gradient norm ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process(shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return spawn(run_layout, 1, shards, str(tmp_path_factory.mktemp("ref")), {"dp": 1}, {"zero_stage": 0})[0]


@pytest.mark.integration
@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}], ids=["tp2", "pp2"])
def test_zero0_grad_norm_matches_one_process(shards: list[str], one_process: dict[str, Any], tmp_path: Path,
                                             layout: dict[str, int]) -> None:
    ref = [one_process["rows"][s]["grad_norm"] for s in (1, 2, 3)]
    assert all(x > 0 and math.isfinite(x) for x in ref)
    r0, r1 = spawn(run_layout, 2, shards, str(tmp_path), layout, {"zero_stage": 0})
    got = [r0["rows"][s]["grad_norm"] for s in (1, 2, 3)]
    assert got == pytest.approx(ref, rel=1e-4), (got, ref)  # old: local shards only (tp), 0.0 (pp)
    assert _close(r0["losses"], one_process["losses"]) and r0["losses"] == r1["losses"]


def run_clip_probe(shards: list[str], run_dir: str, layout: dict[str, int], clip: float) -> dict[str, Any]:
    """spawn() target: ZeRO 0 with grad_clip=`clip`. Per step, this rank's share of the squared global
    gradient norm the optimizer applies (counted as `model_parallel_grad_norm` counts it: TP-replicated
    weights on TP rank 0, pipeline-tied copies once)."""
    import torch
    import torch.distributed as dist

    from kubellm.training import engine as E

    applied: list[float] = []
    real_build = E.build_engine

    def build(*a: Any, **k: Any) -> Any:
        eng, sched = real_build(*a, **k)

        def pre_step(opt: Any, args: Any, kwargs: Any) -> None:
            tp_rank = dist.get_rank() if layout.get("tp", 1) > 1 else 0  # the group exists by now
            sq = 0.0
            for p in eng.module.parameters():
                if p.grad is None or getattr(p, "ds_pipe_replicated", False):
                    continue
                if tp_rank != 0 and not getattr(p, "tensor_model_parallel", False):
                    continue
                sq += float(torch.linalg.vector_norm(p.grad.double())) ** 2
            applied.append(sq)

        eng.optimizer.register_step_pre_hook(pre_step)
        return eng, sched

    E.build_engine = build  # type: ignore[assignment]
    out = run_layout(shards, run_dir, layout, {"zero_stage": 0, "optim": _optim(clip)})
    return {**out, "applied_sq": applied}


def _optim(clip: float) -> Any:
    from kubellm.training.config import OptimConfig

    return OptimConfig(lr=3e-3, warmup_steps=2, grad_clip=clip)


@pytest.mark.integration
@pytest.mark.parametrize("layout", [{"dp": 1}, {"tp": 2}, {"pp": 2}], ids=["dense", "tp2", "pp2"])
def test_zero0_clips_every_rank_by_the_global_norm(shards: list[str], tmp_path: Path, layout: dict[str, int]) -> None:
    """The gradients the optimizer applies have global norm grad_clip when the step's norm is above it,
    in every layout (DeepSpeed's own pipeline clip measured pipe stage 0 alone: the later stage was
    scaled by a norm 27% short of the global one)."""
    clip = 0.01
    ranks = spawn(run_clip_probe, 1 if layout == {"dp": 1} else 2, shards, str(tmp_path), layout, clip)
    pre = [ranks[0]["rows"][s]["grad_norm"] for s in (1, 2, 3)]  # the logged norm: before clipping
    assert all(x > 10 * clip for x in pre), pre  # clipping engages on every step
    applied = [math.sqrt(sum(r["applied_sq"][i] for r in ranks)) for i in range(3)]
    assert applied == pytest.approx([clip] * 3, rel=1e-3), (applied, pre)
    if len(ranks) == 2:  # both ranks hold a share of the model
        assert all(r["applied_sq"][0] > 0 for r in ranks)


@pytest.mark.integration
def test_tp2_inf_gradient_on_one_shard_skips_on_both_ranks(shards: list[str], tmp_path: Path) -> None:
    ranks = spawn(run_tp_one_shard_inf, 2, shards, str(tmp_path))
    for r in ranks:
        assert r["skipped_nonfinite"] == 1.0, ranks
    assert ranks[0]["replicated"] == ranks[1]["replicated"]  # the norms did not diverge


def run_tp_one_shard_inf(shards: list[str], run_dir: str) -> dict[str, Any]:
    """tp=2, ZeRO 0: at step 2 only TP rank 0's shard of one weight gets an infinite gradient."""
    import torch.distributed as dist

    from kubellm.pretrain.objective import PretrainObjective
    from kubellm.training import engine as E
    from kubellm.training.config import ParallelConfig

    captured: dict[str, Any] = {}
    real_build = E.build_engine

    def build(*a: Any, **k: Any) -> Any:
        captured["engine"], sched = real_build(*a, **k)
        return captured["engine"], sched

    E.build_engine = build  # type: ignore[assignment]
    inner = PretrainObjective(shards, seq_len=SEQ, vocab_size=VOCAB)
    calls = [0]

    class Objective:
        build_loader, tokens = inner.build_loader, inner.tokens

        def loss(self, model: Any, batch: Any) -> Any:
            calls[0] += 1
            if calls[0] == 8 and dist.get_rank() == 0:  # step 2's last micro-batch (accum 4)
                p = dict(model.module.named_parameters())["blocks.0.attn.out.weight"]
                hook: list[Any] = []
                hook.append(p.register_hook(lambda g: (hook[0].remove(), g * float("inf"))[1]))
            return inner.loss(model, batch)

    r = E.train(_model(), _train_cfg(zero_stage=0, nonfinite="skip"), ParallelConfig(tp=2), Objective(),
                run_dir, resume=False)
    params = dict(captured["engine"].module.named_parameters())
    replicated = {n: p.detach().tolist() for n, p in params.items() if not getattr(p, "tensor_model_parallel", False)}
    return {"skipped_nonfinite": r.summary["skipped_nonfinite"], "replicated": replicated}


# -- 1: the pipeline runs the guard before DeepSpeed's update ----------------------------------------------
@pytest.mark.integration
def test_pp2_nan_loss_stops_on_every_rank(shards: list[str], tmp_path: Path) -> None:
    ranks = spawn(run_layout, 2, shards, str(tmp_path), {"pp": 2}, {"zero_stage": 0, "nonfinite": "stop"},
                  None, True)
    for r in ranks:  # old: completed with NaN losses (the guard never ran)
        assert "error" in r and "loss is nan at step 1" in r["error"], r


@pytest.mark.integration
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_pp2_skips_nan_and_spike_like_one_process(shards: list[str], tmp_path: Path, zero_stage: int) -> None:
    kw = {"zero_stage": zero_stage, "nonfinite": "skip", "spike_sigma": 3.0, "spike_window": 2, "max_steps": 5}
    factor = {2: float("nan"), 4: 50.0}
    ref = spawn(run_layout, 1, shards, str(tmp_path / "ref"), {"dp": 1}, kw, factor)[0]
    r0, _ = spawn(run_layout, 2, shards, str(tmp_path / "pp"), {"pp": 2}, kw, factor)
    assert [s for s, row in ref["rows"].items() if row["skipped"]] == [2, 4]
    assert [s for s, row in r0["rows"].items() if row["skipped"]] == [2, 4]
    assert r0["summary"]["skipped_nonfinite"] == 1.0 and r0["summary"]["skipped_spike"] == 1.0
    # the skipped steps left the weights (and the LR schedule) alone: later steps match 1 process
    assert _close(r0["losses"], ref["losses"]), (r0["losses"], ref["losses"])
    assert [r0["rows"][s]["lr"] for s in range(1, 6)] == pytest.approx([ref["rows"][s]["lr"] for s in range(1, 6)])


# -- 4: SFT token weighting through the pipeline -------------------------------------------------------
def run_masked(shards: list[str], run_dir: str, layout: dict[str, int]) -> list[float]:
    """An SFT-like objective (labels masked per row, `target_tokens`) in the given layout."""
    from kubellm.pretrain.objective import PretrainObjective
    from kubellm.training.config import ParallelConfig
    from kubellm.training.engine import train

    class Masking:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __iter__(self) -> Any:
            return self

        def __next__(self) -> Any:
            b = dict(next(self.inner))
            labels = b["labels"].clone()
            for i in range(labels.shape[0]):  # a content-determined prompt length per row
                labels[i, : int(b["input_ids"][i].sum()) % 31] = -100
            b["labels"] = labels
            return b

        def state_dict(self) -> Any:
            return self.inner.state_dict()

        def load_state_dict(self, sd: Any) -> None:
            self.inner.load_state_dict(sd)

    class Masked(PretrainObjective):
        def build_loader(self, *a: Any) -> Any:
            return Masking(super().build_loader(*a))

        def loss(self, model: Any, batch: Any) -> Any:
            return model(batch["input_ids"], labels=batch["labels"], ignore_index=-100), {}

        def target_tokens(self, batch: Any) -> int:
            return int((batch["labels"] != -100).sum())

    obj = Masked(shards, seq_len=SEQ, vocab_size=VOCAB)
    return train(_model(), _train_cfg(zero_stage=0), ParallelConfig(**layout), obj, run_dir, resume=False).losses


@pytest.mark.integration
def test_pp2_sft_token_weighting_matches_one_process(shards: list[str], tmp_path: Path) -> None:
    ref = spawn(run_masked, 1, shards, str(tmp_path / "ref"), {"dp": 1})[0]
    got = spawn(run_masked, 2, shards, str(tmp_path / "pp"), {"pp": 2})[0]
    assert got == pytest.approx(ref, rel=2e-6), (got, ref)  # old: a mean of micro-batch means (~1e-3 off)


# -- 3: DeepSpeed's bf16 optimizer wrapper (the CUDA path) ------------------------------------------------
def run_ds_bf16(shards: list[str], run_dir: str, policy: str) -> dict[str, Any]:
    """1 process with the CUDA-path DeepSpeed config (bf16 mode: DeepSpeed's optimizer wrapper computes
    the norm in step()), infinite gradients under a finite loss at step 2."""
    import kubellm.training.dsconfig as D
    import kubellm.training.engine as E
    from kubellm.training.config import ParallelConfig

    E.deepspeed_config = lambda t, p, w, device="cpu", m=None: D.deepspeed_config(t, p, w, "cuda", m)  # type: ignore[assignment]
    E.clips_in_kubellm = lambda t, p, device="cpu": D.clips_in_kubellm(t, p, "cuda")  # type: ignore[assignment]

    from tests.reliability.relkit import inf_grad_fn

    InfGrad = inf_grad_fn()
    obj = _FaultyObjective(shards, {2: InfGrad.apply}, 4)  # finite loss, infinite gradients
    try:
        r = E.train(_model(), _train_cfg(zero_stage=0, precision="bf16", nonfinite=policy, max_steps=5),
                    ParallelConfig(dp=1), obj, run_dir, resume=False)
    except FloatingPointError as e:
        return {"error": str(e)}
    return {"rows": _rows(r), "summary": r.summary}


@pytest.mark.integration
def test_deepspeed_bf16_norm_is_read_after_step(shards: list[str], tmp_path: Path) -> None:
    r = spawn(run_ds_bf16, 1, shards, str(tmp_path / "skip"), "skip")[0]
    rows = r["rows"]
    # old: the norm was the previous step's, so step 2 went unnoticed and every later step was skipped
    assert [rows[s]["skipped"] for s in range(1, 6)] == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert not math.isfinite(rows[2]["grad_norm"])
    assert all(math.isfinite(rows[s]["grad_norm"]) and rows[s]["grad_norm"] > 0 for s in (1, 3, 4, 5))
    assert r["summary"]["skipped_nonfinite"] == 1.0
    stop = spawn(run_ds_bf16, 1, shards, str(tmp_path / "stop"), "stop")[0]
    assert "at step 2" in stop["error"], stop  # old: one step late (step 3)


# -- 5: a relayout resume holds the LR schedule on skipped steps ----------------------------------------
def test_relayout_scheduler_position_counts_applied_steps() -> None:
    from kubellm.training.relayout import Relayout

    class Sched:
        steps = 0

        def step(self) -> None:
            self.steps += 1

    guard = {"window": [], "skipped": {"nonfinite": 1, "spike": 1}}
    for state, want in (({"step": 5, "guard": guard}, 3), ({"step": 5, "guard": guard, "lr_steps": 4}, 4),
                        ({"step": 5}, 5)):
        sched = Sched()
        Relayout(manifest=None, state_dict={}, client_state=state, saved_layout={}).apply(sched)  # type: ignore[arg-type]
        assert sched.steps == want, state


@pytest.mark.integration
def test_relayout_resume_keeps_the_lr_of_an_uninterrupted_run(shards: list[str], tmp_path: Path) -> None:
    from kubellm.core.manifest import MANIFEST_NAME

    kw = {"zero_stage": 1, "nonfinite": "skip", "max_steps": 5, "checkpoint_every": 3, "keep_checkpoints": 3}
    full = spawn(run_layout, 1, shards, str(tmp_path / "a"), {"dp": 1}, kw, {2: float("nan")})[0]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "step-00000005" / MANIFEST_NAME).unlink()
    resumed = spawn(run_layout, 2, shards, str(tmp_path / "b"), {"pp": 2}, kw, None, False, True)[0]
    assert resumed["start"] == 3
    for s in (4, 5):  # old: the schedule was one position (the skipped step) ahead
        assert resumed["rows"][s]["lr"] == pytest.approx(full["rows"][s]["lr"], rel=1e-9)
    assert resumed["losses"][0] == pytest.approx(full["losses"][3], rel=1e-4)


# -- 6: the spawn harness -------------------------------------------------------------------------------
def big_result(n: int) -> bytes:
    return b"x" * n


@pytest.mark.integration
def test_spawn_returns_results_larger_than_a_pipe_buffer() -> None:
    # old: the parent joined first, the workers blocked in put() and the call ran into its timeout
    assert [len(x) for x in spawn(big_result, 2, 200_000, timeout=20)] == [200_000, 200_000]
