"""ZeRO 0/1/2/3 per-rank memory in engine-owned tensors, 2 ranks (gloo, CPU), against the ZeRO
paper's formulas; and the planner's estimates (`kubellm.training.planner`) against the same
measurements (the issue-11 planner benchmark).

    python -m bench.bench_zero_memory          # seed preset, ZeRO 0–3, fp32 and bf16
    python -m bench.bench_zero_memory --quick  # debug preset

What is counted (not RSS): every tensor DeepSpeed's engine holds after the backward pass of the
second step (so Adam state exists and gradients are live) — the module's parameters (ZeRO-3: each
parameter's `ds_tensor` partition), their `.grad`s, the torch optimizer's state, its parameter
groups (ZeRO ≥ 1: the fp32 master partitions) and every tensor attribute of the ZeRO optimizer
(flat buffers, gradient partitions, and the gradient reduce buckets inside its bucket objects),
deduplicated by storage so views count once. The DeepSpeed config is the engine's own
(`dsconfig.deepspeed_config` with the model: reduce bucket dim² elements, at least 2^20 and at most
Ψ; ZeRO-3 partitions every parameter of 10·dim elements or more). The reduce buckets are reported
apart ("buffers"): the paper's formula has no term for them, the planner has.

Two precisions, each against the paper's formula for it (Rajbhandari et al. 2020, §3), partitioned
over N ranks by stage (Z0: all replicated; Z1: optimizer state; Z2: + gradients; Z3: + parameters):
* fp32 — what the engine runs on CPU (bf16 there is autocast over fp32 weights): the weights are their
  own master copy, so params 4Ψ, grads 4Ψ, Adam's two moments 8Ψ (K = 8).
* bf16 mixed precision — the paper's own case and what the engine runs on CUDA: the DeepSpeed config
  `deepspeed_config` writes for bf16 on CUDA (`bf16.enabled`), run here on DeepSpeed's CPU accelerator
  (the ZeRO bookkeeping is the same code): params 2Ψ, grads 2Ψ, fp32 master + two moments 12Ψ (K = 12).
DeepSpeed holds more than the formulas in two places, and the rows say so rather than fitting the
formula to it: at fp32 its ZeRO ≥ 1 optimizers still keep an fp32 copy of their partition (+4Ψ/N,
under `optim`), and ZeRO-2 keeps the whole gradient of every parameter that overlaps the rank's
partition (`planner.zero2_grad_elements`; here, with the 1.28M-element embedding and LM head and
N = 2, rank 0 holds all of them). The planner rows model what DeepSpeed holds.
Activations: bytes of tensors autograd saves in one forward (saved-tensor hooks), run as training
runs it (`engine(ids, labels=labels)`: the loss fused into the LM head, no logits kept), vs
`planner.activation_bytes` without the head's transient logits chunk (it is never saved).
Target (issue 12): measured within ±10% of the formula.
"""

from __future__ import annotations

from typing import Any

from bench.common import Row, emit, load_avg, parser, within


def _tensors(obj: Any, depth: int = 0):  # noqa: ANN202 — a generator of tensors inside lists/dicts
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x, depth + 1)
    elif depth < 4 and type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        for x in vars(obj).values():  # DeepSpeed's own holders (the IPG bucket objects and their buffers)
            yield from _tensors(x, depth + 1)


def measure_rank(preset: str, zero: int, precision: str = "fp32") -> dict[str, float]:
    """Runs on each rank (kubellm.training.spawn): two steps, then count engine-owned bytes.

    precision "bf16": the DeepSpeed config the engine writes for bf16 on CUDA (`bf16.enabled`: bf16
    weights and gradients, fp32 master copy in the optimizer), run here on DeepSpeed's CPU accelerator."""
    import deepspeed
    import torch

    from kubellm.model import Transformer
    from kubellm.model.config import get_preset
    from kubellm.training.config import ParallelConfig, TrainConfig
    from kubellm.training.dsconfig import deepspeed_config
    from kubellm.training.optim import param_groups
    from kubellm.training.process_group import init_distributed

    cfg = get_preset(preset)
    seq, micro = 64, 2
    tc = TrainConfig(micro_batch_size=micro, global_batch_size=micro * 2, seq_len=seq, zero_stage=zero,
                     precision=precision)
    init_distributed("cpu")
    ds = deepspeed_config(tc, ParallelConfig(), 2, "cuda" if precision == "bf16" else "cpu", cfg)  # the engine's
    torch.manual_seed(0)
    model = Transformer(cfg)
    psi = sum(p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, tc.optim), config=ds)
    ids = torch.randint(0, cfg.vocab_size, (micro, seq + 1), generator=torch.Generator().manual_seed(1))

    def fwd_bwd() -> None:  # as pretrain and SFT call the model: the loss fused into the LM head
        engine.backward(engine(ids[:, :-1], labels=ids[:, 1:]))

    fwd_bwd()
    engine.step()
    # ZeRO-1/2 allocate their reduce buckets at the start of a backward and free them at its end
    # (`_release_ipg_buffers`): read them just before they go, as the peak inside backward holds them
    in_backward: list[float] = []
    release = getattr(engine.optimizer, "_release_ipg_buffers", None)
    if release is not None:
        def counted_release() -> None:
            in_backward.append(sum(float(t.untyped_storage().nbytes()) for t in _tensors(engine.optimizer.ipg_buckets)))
            release()

        engine.optimizer._release_ipg_buffers = counted_release
    fwd_bwd()  # measure here: params, live grads and Adam state all exist

    seen: set[int] = set()
    out = {"params": 0.0, "grads": 0.0, "optim": 0.0, "other": 0.0, "buffers": 0.0}

    where: dict[str, float] = {}

    def add(t: Any, cat: str, src: str = "") -> None:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in seen or st.nbytes() == 0:
            return
        seen.add(key)
        out[cat] += st.nbytes()
        where[f"{cat}:{src}"] = where.get(f"{cat}:{src}", 0.0) + st.nbytes()

    for p in engine.module.parameters():
        add(getattr(p, "ds_tensor", None), "params", "ds_tensor")
        add(p.data, "params", "module")
    for p in engine.module.parameters():
        add(p.grad, "grads", "module .grad")
    zopt = engine.optimizer
    inner = getattr(zopt, "optimizer", zopt)
    for state in inner.state.values():
        for v in state.values():
            add(v, "optim", "adam state")
    for g in inner.param_groups:
        for p in g["params"]:
            add(p, "optim", "optimizer params")  # fp32 masters (at fp32 ZeRO-0 the module's, counted above)
            add(p.grad, "grads", "optimizer params .grad")
    if zopt is not inner:
        for name, value in vars(zopt).items():
            if name in ("optimizer", "module"):
                continue
            low = name.lower()
            cat = ("buffers" if "ipg" in low else "grads" if "grad" in low else "optim" if "fp32" in low or "master" in low
                   else "params" if "bit16" in low or "fp16" in low or "param" in low else "other")
            for t in _tensors(value):
                add(t, cat, name)

    # activations: what autograd saves for backward in one forward (deduplicated by storage)
    act_seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        act_seen[st.data_ptr()] = st.nbytes()
        return t

    engine.module.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = engine(ids[:, :-1], labels=ids[:, 1:])
    param_ptrs = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
    act = sum(v for k, v in act_seen.items() if k not in param_ptrs)
    del loss
    out["buffers"] += max(in_backward, default=0.0)  # freed by now: not found in the walk above
    out["where"] = {k: v for k, v in where.items() if v >= 1024}  # type: ignore[assignment]
    out.update(psi=float(psi), activations=float(act), seq=float(seq), micro=float(micro))
    return out


def formula(psi: float, zero: int, n: int, precision: str = "fp32") -> dict[str, float]:
    """The paper's per-rank bytes: mixed precision (bf16) 2Ψ params + 2Ψ grads + KΨ optimizer with
    K = 12 (fp32 master copy + Adam's two moments); fp32 4Ψ + 4Ψ + 8Ψ (the weights are the master)."""
    p, g, k = (2, 2, 12) if precision == "bf16" else (4, 4, 8)
    return {"params": p * psi / (n if zero >= 3 else 1), "grads": g * psi / (n if zero >= 2 else 1),
            "optim": k * psi / (n if zero >= 1 else 1)}


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    from kubellm.model.config import get_preset
    from kubellm.training.spawn import spawn

    preset = "debug" if args.quick else "seed"
    cfg = get_preset(preset)
    rows: list[Row] = []
    for precision in ("fp32", "bf16"):
        for zero in (0, 1, 2, 3):
            load = load_avg()
            per_rank = spawn(measure_rank, 2, preset, zero, precision)
            m = max(per_rank, key=lambda r: r["params"] + r["grads"] + r["optim"])
            rows += _rows(cfg, preset, zero, precision, m, load)
    return emit(rows, args)


def _rows(cfg: Any, preset: str, zero: int, precision: str, m: dict[str, Any], load: float) -> list[Row]:
    """The formula row, the planner row and (ZeRO-0) the activation row for one measurement."""
    from kubellm.training.dsconfig import zero_buffer_sizes
    from kubellm.training.planner import activation_bytes, head_bytes, model_state_bytes, param_group_sizes

    mb = 2**20
    psi = m["psi"]
    f = formula(psi, zero, 2, precision)
    measured = m["params"] + m["grads"] + m["optim"] + m["other"]
    ratio = measured / sum(f.values())
    ok, note = within(ratio, 0.10)
    mode = "fp32" if precision == "fp32" else "bf16 mixed precision (DeepSpeed bf16 mode, the engine's CUDA config)"
    copy = ""
    if zero >= 1 and precision == "fp32":
        copy = f"; DeepSpeed's fp32 copy of the partition (weights already fp32) is {4 * psi / 2 / mb:.2f} MiB of optim"
    held = ", ".join(f"{k.split(':', 1)[1]} {v / mb:.2f}" for k, v in m["where"].items() if k.startswith("grads:"))
    rows = [Row(
        f"ZeRO-{zero} per-rank model-state memory, 2 ranks, {preset} (Ψ={psi / 1e6:.2f}M, {mode})",
        measured / mb, sum(f.values()) / mb, "MiB", ratio, "within ±10%", ok,
        f"measured params/grads/optim/other {m['params'] / mb:.2f}/{m['grads'] / mb:.2f}/{m['optim'] / mb:.2f}/"
        f"{m['other'] / mb:.2f} MiB vs formula {f['params'] / mb:.2f}/{f['grads'] / mb:.2f}/{f['optim'] / mb:.2f}; "
        f"grads held in: {held}{copy}; besides, DeepSpeed's gradient reduce buckets {m['buffers'] / mb:.2f} MiB (ZeRO-1/2: alive during backward) "
        f"(no term in the formula). {note}".rstrip(". "), load, 1)]
    bucket = zero_buffer_sizes(cfg)["reduce_bucket_size"]
    pp, pg, po = model_state_bytes(psi, zero, 2, precision, param_group_sizes(cfg), bucket)
    held_all = measured + m["buffers"]
    pr = (pp + pg + po) / held_all
    ok2, note2 = within(pr, 0.10)
    rows.append(Row(f"planner model_state_bytes vs measured, ZeRO-{zero}, 2 ranks, {precision}", (pp + pg + po) / mb,
                    held_all / mb, "MiB", pr, "within ±10%", ok2,
                    f"planner params/grads (with the {bucket:,}-element reduce bucket at ZeRO ≥ 1)/optim "
                    f"{pp / mb:.2f}/{pg / mb:.2f}/{po / mb:.2f} MiB vs measured states {measured / mb:.2f} + buckets "
                    f"{m['buffers'] / mb:.2f} MiB. {note2}".strip(), load, 1))
    if zero == 0:
        seq, micro = int(m["seq"]), int(m["micro"])
        est = activation_bytes(cfg, seq, micro, 1, 1, 1, False, precision, transient=False)
        head = head_bytes(cfg, seq * micro, 1, 1, precision, transient=False)
        chunk = head_bytes(cfg, seq * micro, 1, 1, precision) - head
        ar = est / m["activations"]
        ok3, note3 = within(ar, 0.10)
        rows.append(Row(f"planner activation_bytes vs autograd-saved tensors, {preset}, {precision}, micro "
                        f"{micro} × seq {seq}", est / mb, m["activations"] / mb, "MiB", ar,
                        "within ±10%", ok3,
                        f"model(ids, labels=...) as in training; planner {cfg.n_layers} blocks "
                        f"{(est - head) / mb:.2f} + embedding/final norm/fused head {head / mb:.2f} MiB "
                        f"(dw fp32 {cfg.vocab_size * cfg.dim * 4 / mb:.2f}); the planner also counts a "
                        f"{chunk / mb:.2f} MiB transient logits chunk (never saved). {note3}".strip(),
                        load, 1))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
