"""kubellm plan: memory formulas (activations checked against autograd's saved tensors, ZeRO-2
gradients against DeepSpeed's partitioning), layout rules, refusal with numbers, the 7B on 8×80 GB
example."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from kubellm.cli import main as cli_main
from kubellm.core.errors import ConfigError
from kubellm.model import Transformer
from kubellm.model.config import ModelConfig, get_preset
from kubellm.training.planner import (
    Request,
    activation_bytes,
    layer_activation_bytes,
    model_state_bytes,
    param_group_sizes,
    plan,
    to_fragment,
    zero2_grad_elements,
)


def test_zero_memory_formulas_match_the_paper() -> None:
    psi, dp = 7.5e9, 64  # the ZeRO paper's example: 7.5B params, Nd = 64, K = 12
    tot = lambda z: sum(model_state_bytes(psi, z, dp, "bf16")) / 1e9  # noqa: E731
    assert tot(0) == pytest.approx(120, rel=1e-3)
    assert tot(1) == pytest.approx(31.4, rel=1e-2)
    assert tot(2) == pytest.approx(16.6, rel=1e-2)
    assert tot(3) == pytest.approx(1.875, rel=1e-3)  # the paper rounds to 1.9


def test_7b_on_8x80gb_fits_and_respects_rules() -> None:
    req = Request(model=get_preset("7b"), gpus=8, gpu_mem_gb=80, seq_len=4096, global_batch=256)
    layouts = plan(req, top=50)
    assert layouts and all(lay.mem_total_gb <= 72 for lay in layouts)
    assert all(lay.dp * lay.tp * lay.pp == 8 for lay in layouts)
    assert not any(lay.pp > 1 and lay.zero > 1 for lay in layouts)  # DeepSpeed refuses ZeRO-2/3 with PP
    steps = [lay.step_s for lay in layouts]
    assert all(b >= a * 0.99 for a, b in zip(steps, steps[1:], strict=False))  # fastest first (1% buckets)
    # Plain DP with ZeRO-0 needs 16 bytes/param ≈ 105 GB for 7B: it must not be offered.
    assert not any(lay.tp == 1 and lay.pp == 1 and lay.zero == 0 for lay in layouts)
    frag = to_fragment(req, layouts[0])
    launch = frag["pretrain"]["launch"]
    assert (launch["backend"], launch["nproc_per_node"], launch["nnodes"], launch["gpu"]) == ("pytorchjob", 8, 1, 8)
    # the fragment is a valid run-config
    from kubellm.core.config import validate
    from kubellm.runconfig import RunConfig

    cfg = validate(RunConfig, {**frag, "pretrain": {**frag["pretrain"], "model": {"preset": "7b"}}})
    assert cfg.pretrain.parallel.dp == layouts[0].dp


def test_refuses_what_cannot_fit_with_numbers() -> None:
    req = Request(model=get_preset("7b"), gpus=1, gpu_mem_gb=16, seq_len=4096, global_batch=8)
    with pytest.raises(ConfigError, match=r"do not fit 1 × 16 GiB: the smallest layout needs \d+\.\d GiB per GPU > 14\.4 GiB usable"):
        plan(req)


def test_cli_writes_a_fragment(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "plan.yaml"
    r = subprocess.run([sys.executable, "-m", "kubellm.cli", "plan", "--model", "7b", "--gpus", "8",
                        "--gpu-mem-gb", "80", "--seq-len", "4096", "--output", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    frag = yaml.safe_load(out.read_text())
    p = frag["pretrain"]["parallel"]
    assert p["dp"] * p["tp"] * p["pp"] == 8
    r = subprocess.run([sys.executable, "-m", "kubellm.cli", "plan", "--model", "7b", "--gpus", "1",
                        "--gpu-mem-gb", "8"], capture_output=True, text=True)
    assert r.returncode == 1 and "do not fit" in r.stderr and "Traceback" not in r.stderr


def test_readme_plan_example_is_what_the_planner_prints(tmp_path, capsys, monkeypatch) -> None:  # noqa: ANN001
    """The README's `kubellm plan` example is this planner's real output (it went stale once)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(readme) if line.startswith("$ kubellm plan "))
    end = next(i for i in range(start, len(readme)) if readme[i].startswith("wrote "))
    args = readme[start].split()[3:]  # after "$ kubellm plan"
    assert args[-2] == "--output", args
    monkeypatch.chdir(tmp_path)
    assert cli_main(["plan", *args]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:-1] == readme[start + 1 : end]
    assert printed[-1] == f"wrote {args[-1]}" and (tmp_path / args[-1]).is_file()


# -- activations: the planner's count against what autograd saves (fp32 and bf16 weights, CPU) ------------
SHAPES = [  # MHA, GQA, MQA; ffn_dim not 4·dim
    ModelConfig(vocab_size=384, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=32),
    ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=32),
    ModelConfig(vocab_size=320, dim=96, n_layers=1, n_heads=6, n_kv_heads=1, ffn_dim=320, max_seq_len=32),
]


def _saved_bytes(fn: Callable[[], torch.Tensor], model: Transformer) -> int:
    """Bytes of the storages autograd saves while `fn` runs, parameters and RoPE tables excluded."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), model.rope.cos, model.rope.sin]}
    return sum(n for ptr, n in seen.items() if ptr not in skip)


def _model(cfg: ModelConfig, precision: str) -> Transformer:
    """fp32, or bf16 weights as DeepSpeed's bf16 mode holds them (the module cast to bf16)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    return model.bfloat16() if precision == "bf16" else model


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("cfg", SHAPES, ids=["mha", "gqa", "mqa"])
def test_block_activation_count_is_what_autograd_saves(cfg: ModelConfig, precision: str) -> None:
    model = _model(cfg, precision)
    b, t = 2, 16
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x = torch.randn(b, t, cfg.dim, requires_grad=True, dtype=dtype)  # a block's input is the residual stream
    cos, sin, mask, causal = model.attention_inputs(torch.zeros(b, t, dtype=torch.long))
    got = _saved_bytes(lambda: model.blocks[0](x, cos, sin, mask, causal), model)
    assert got == layer_activation_bytes(cfg, b * t, 1, precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("cfg", SHAPES[1:], ids=["gqa", "mqa"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["full", "checkpointed"])
def test_model_activation_bytes_match_the_fused_loss_forward(cfg: ModelConfig, ckpt: bool, precision: str) -> None:
    """As training runs it: model(ids, labels=...) — fused head (dh, fp32 dw), no logits saved."""
    model = _model(cfg, precision)
    model.set_activation_checkpointing(ckpt)
    b, t = 2, 16
    ids = torch.randint(0, cfg.vocab_size, (b, t + 1))
    got = _saved_bytes(lambda: model(ids[:, :-1], labels=ids[:, 1:]), model)
    est = activation_bytes(cfg, t, b, 1, 1, 1, ckpt, precision, transient=False)
    if ckpt:  # the block recomputed in backward is not alive during the forward measured here
        est -= layer_activation_bytes(cfg, b * t, 1, precision)
    assert est == pytest.approx(got, rel=0.01)
    # the fused head keeps no (tokens × vocab) logits: the transient chunk is all of them here, in
    # fp32 (+ the bf16 matmul output it is upcast from)
    per_logit = 4 + (2 if precision == "bf16" else 0)
    assert activation_bytes(cfg, t, b, 1, 1, 1, ckpt, precision) - est - (
        layer_activation_bytes(cfg, b * t, 1, precision) if ckpt else 0) == b * t * cfg.vocab_size * per_logit


def test_activation_bytes_scale_with_tp_and_precision() -> None:
    cfg = get_preset("7b")
    full = layer_activation_bytes(cfg, 4096, 1, "bf16")
    # per token, bf16: 2·(4D + 4 + 4D) norms + 2·(3Q + 3K + 4F) + 4H, Q = K = D
    assert full == 4096 * (2 * (8 * 4096 + 4) + 2 * (6 * 4096 + 4 * 11008) + 4 * 32)
    # TP splits heads and ffn, not the norms
    assert layer_activation_bytes(cfg, 4096, 2, "bf16") == 4096 * (2 * (8 * 4096 + 4) + (2 * (6 * 4096 + 4 * 11008)
                                                                                        + 4 * 32) / 2)
    assert layer_activation_bytes(cfg, 4096, 1, "fp32") > full


# -- ZeRO-2 gradients as DeepSpeed holds them --------------------------------------------------------------
@pytest.mark.parametrize("cfg", [get_preset("seed"), get_preset("debug").with_(tie_embeddings=True)],
                         ids=["seed", "debug-tied"])
def test_param_group_sizes_are_the_optimizer_groups(cfg: ModelConfig) -> None:
    from kubellm.training.config import OptimConfig
    from kubellm.training.optim import param_groups

    groups = param_groups(Transformer(cfg), OptimConfig())
    assert param_group_sizes(cfg) == [[p.numel() for p in g["params"]] for g in groups]


def test_zero2_grads_are_whole_parameters_overlapping_the_partition() -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert zero2_grad_elements([[10, 10, 10, 10]], 2) == 20  # boundaries align: Ψ/dp
    assert zero2_grad_elements([[25, 15]], 2) == 40  # rank 1 holds the straddling 25 and its own 15
    # against DeepSpeed's own partition rule, on the seed model's groups
    groups = param_group_sizes(get_preset("seed"))
    for dp in (2, 3, 8):
        held = [0] * dp
        for sizes in groups:
            size = math.ceil(sum(sizes) / (2 * dp)) * 2 * dp // dp  # flatten_dense_tensors_aligned / dp
            tensors = [torch.empty(n, device="meta") for n in sizes]
            for r in range(dp):
                inside, _, _ = DeepSpeedZeroOptimizer.get_partition_info(None, tensors, size, r)  # type: ignore[arg-type]
                held[r] += sum(t.numel() for t in inside)
        assert zero2_grad_elements(groups, dp) == max(held)
    # seed, 2 ranks, fp32: rank 0's partition touches the embedding and the LM head, so it holds
    # every gradient but the last group's norms — what bench/bench_zero_memory.py measures
    psi = sum(map(sum, groups))
    _, grads, _ = model_state_bytes(psi, 2, 2, "fp32", groups)
    assert grads == 4 * (psi - 13 * 128)
    _, grads16, _ = model_state_bytes(psi, 2, 2, "bf16", groups)
    assert grads16 == grads / 2  # the model dtype: kubellm sets no fp32 grad_accum_dtype
    assert model_state_bytes(psi, 2, 2, "fp32")[1] == 4 * psi / 2  # without groups: the paper's Ψ/dp


@pytest.mark.integration
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_planner_model_states_match_deepspeed_bf16_mode(zero: int) -> None:
    """The planner's bf16 model states (the engine's CUDA layout: DeepSpeed bf16 mode, fp32 master
    partition) against the tensors DeepSpeed's engine holds, 2 gloo ranks on DeepSpeed's CPU
    accelerator, counted as bench/bench_zero_memory.py counts them."""
    from bench.bench_zero_memory import measure_rank
    from kubellm.training.spawn import spawn

    per_rank = spawn(measure_rank, 2, "debug", zero, "bf16")
    measured = max(r["params"] + r["grads"] + r["optim"] + r["other"] for r in per_rank)
    psi = per_rank[0]["psi"]
    planned = sum(model_state_bytes(psi, zero, 2, "bf16", param_group_sizes(get_preset("debug"))))
    assert planned == pytest.approx(measured, rel=0.01)
    # and the paper's mixed-precision optimizer term: fp32 master + two moments, 12Ψ/N
    assert max(r["optim"] for r in per_rank) == pytest.approx(12 * psi / 2, rel=0.01)


def test_dp_communication_follows_when_each_zero_stage_communicates() -> None:
    """ZeRO-2 reduce-scatters at every micro-batch and ZeRO-3 also all-gathers parameters twice per
    micro-batch; the planner had counted one reduction per optimizer step for both, so on the README's
    7B × 8 example (32 micro-batches a step) it ranked ZeRO-2 first at a sixteenth of its traffic."""
    from kubellm.training.planner import dp_comm_bytes

    one = 7 / 8 * 1e9 * 2  # one ring pass of 1e9 bf16 values over 8 ranks
    assert dp_comm_bytes(1e9, 2, 8, 0, 32) == dp_comm_bytes(1e9, 2, 8, 1, 32) == pytest.approx(2 * one)
    assert dp_comm_bytes(1e9, 2, 8, 2, 32) == pytest.approx(33 * one)
    assert dp_comm_bytes(1e9, 2, 8, 3, 32) == pytest.approx(96 * one)
    assert dp_comm_bytes(1e9, 2, 8, 2, 1) == dp_comm_bytes(1e9, 2, 8, 1, 1)  # one micro-batch: the same
    assert dp_comm_bytes(1e9, 2, 1, 3, 32) == 0
    req = Request(model=get_preset("7b"), gpus=8, gpu_mem_gb=80, seq_len=4096, global_batch=256)
    by_zero = {lay.zero: lay for lay in plan(req, top=100) if (lay.dp, lay.tp, lay.pp, lay.micro_batch, lay.act_ckpt) == (8, 1, 1, 1, False)}
    assert by_zero[2].step_s > by_zero[1].step_s and by_zero[3].step_s > by_zero[2].step_s


def test_pipeline_stage_compute_counts_attention_at_the_sequence_length() -> None:
    """The stages' forward FLOPs sum to the model's at that length, and attention (which grows with the
    sequence while the head does not) shifts the balance: at pp = 4 the 125m's slowest stage carries a
    larger share at 8192 tokens than at 1 (the head's share shrinks, the blocks' grows)."""
    from kubellm.model.config import get_preset
    from kubellm.model.flops import layer_forward_flops
    from kubellm.training.planner import pipeline_stages

    cfg = get_preset("125m")
    for seq in (1, 2048, 8192):
        emb, block, norm, head = layer_forward_flops(cfg, seq)
        stages = pipeline_stages(cfg, 1, 4, seq)
        assert sum(st.flops for st in stages) == emb + cfg.n_layers * block + norm + head
    share = {seq: 4 * max(st.flops for st in pipeline_stages(cfg, 1, 4, seq))
             / sum(st.flops for st in pipeline_stages(cfg, 1, 4, seq)) for seq in (1, 8192)}
    assert share[8192] != share[1] and share[8192] > 1 and share[1] > 1
