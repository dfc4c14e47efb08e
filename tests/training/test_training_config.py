"""DeepSpeed config generation, batch/layout checks, AdamW groups, the LR schedule, AppDef, metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from torch import nn

from kubellm.core.config import validate
from kubellm.core.errors import ConfigError
from kubellm.model import Transformer, get_preset
from kubellm.pretrain.config import PretrainConfig
from kubellm.training.config import LaunchConfig, OptimConfig, ParallelConfig, TrainConfig
from kubellm.training.dsconfig import deepspeed_config
from kubellm.training.optim import lr_lambda, param_groups


def test_zero_stages_and_offload_are_config_values() -> None:
    for stage in (0, 1, 2, 3):
        ds = deepspeed_config(TrainConfig(zero_stage=stage, micro_batch_size=2, global_batch_size=8),
                              ParallelConfig(dp=2), world_size=2)
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 8
        assert ds["optimizer"]["params"]["torch_adam"] is True
    off = deepspeed_config(TrainConfig(zero_stage=3, offload_optimizer=True, offload_params=True),
                           ParallelConfig(), 1)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "torch_adam" not in off["optimizer"]["params"]  # DeepSpeedCPUAdam with offload


def test_batch_not_dividing_ranks_names_the_fields() -> None:
    with pytest.raises(ConfigError, match=r"train.global_batch_size=10 .* train.micro_batch_size=4 × "
                                          r"data-parallel ranks=2"):
        deepspeed_config(TrainConfig(micro_batch_size=4, global_batch_size=10), ParallelConfig(dp=2), 2)


def test_layout_and_precision_refusals() -> None:
    with pytest.raises(ConfigError, match=r"parallel.dp=1 .* 2 process"):
        deepspeed_config(TrainConfig(), ParallelConfig(dp=1), 2)
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        deepspeed_config(TrainConfig(precision="fp16"), ParallelConfig(), 1)
    with pytest.raises(ConfigError, match="offload_params needs train.zero_stage=3"):
        deepspeed_config(TrainConfig(zero_stage=2, offload_params=True), ParallelConfig(), 1)
    with pytest.raises(ConfigError, match=r"train.compile is supported for dense models only; got parallel.tp=2"):
        deepspeed_config(TrainConfig(compile=True), ParallelConfig(tp=2), 2)


def test_bad_model_shapes_name_the_field() -> None:
    with pytest.raises(ConfigError, match="n_heads=5 must divide dim=64"):
        validate(PretrainConfig, {"model": {"preset": "debug", "overrides": {"n_heads": 5}}}, "run.yaml", "pretrain")
    with pytest.raises(ConfigError, match="n_kv_heads=3 must divide n_heads=4"):
        validate(PretrainConfig, {"model": {"preset": "debug", "overrides": {"n_kv_heads": 3}}}, "run.yaml", "pretrain")


def test_param_groups_exclude_norms_biases_and_embeddings() -> None:
    model = Transformer(get_preset("debug").with_(vocab_size=64))
    model.extra_bias = nn.Parameter(model.norm.weight.new_zeros(3))  # a bias-like 1-D parameter
    groups = param_groups(model, OptimConfig(weight_decay=0.1))
    decay = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert id(model.tok_embeddings.weight) not in decay
    assert id(model.norm.weight) not in decay and id(model.extra_bias) not in decay
    assert id(model.blocks[0].attn.qkv.weight) in decay and id(model.output.weight) in decay
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))
    with_emb = param_groups(model, OptimConfig(decay_embeddings=True))
    assert id(model.tok_embeddings.weight) in {id(p) for p in with_emb[0]["params"]}


def test_lr_schedule_warmup_then_cosine_to_floor() -> None:
    f = lr_lambda(OptimConfig(warmup_steps=4, min_lr_ratio=0.1), max_steps=24)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(24) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 30))


def test_appdef_is_a_torchrun_job_running_the_worker() -> None:
    from kubellm.training.appdef import build_appdef

    # several nodes: a cluster job (the local torchrun scheduler refuses nnodes > 1)
    launch = LaunchConfig(backend="pytorchjob", nproc_per_node=2, nnodes=3, cpu=4, memory_mb=2048, env={"A": "1"})
    app = build_appdef("s3://b/runs/r1/job.json", launch, name="Pretrain r1")
    role = app.roles[0]
    cmd = " ".join([role.entrypoint, *role.args])
    assert "torchrun" in cmd and "--nproc_per_node 2" in cmd and "--nnodes 3" in cmd
    assert "-m kubellm.training.worker --spec s3://b/runs/r1/job.json" in cmd
    assert role.num_replicas == 3 and role.resource.cpu == 4 and role.resource.memMB == 2048
    assert role.env["A"] == "1" and app.metadata["kubellm/nproc_per_node"] == "2"
    assert app.name == "pretrain-r1"


def test_cluster_job_runs_the_image_and_s3_names_the_pipeline_step_was_compiled_with(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kubellm.training.appdef import build_appdef
    from kubellm.training.job import cluster_defaults
    from kubellm.training.pytorchjob.settings import ClusterLaunchSettings

    for k in ("KUBELLM_REGISTRY", "KUBELLM_TAG", "KUBELLM_TRAIN_IMAGE"):
        monkeypatch.delenv(k, raising=False)
    launch = LaunchConfig(backend="pytorchjob", nproc_per_node=2)
    assert build_appdef("s3://b/j.json", launch).roles[0].image.startswith("kubellm-train:")  # no pipeline
    monkeypatch.setenv("KUBELLM_TRAIN_IMAGE", "reg.example.com/ml/kubellm-train:abc@sha256:" + "0" * 64)
    assert build_appdef("s3://b/j.json", launch).roles[0].image == "reg.example.com/ml/kubellm-train:abc@sha256:" + "0" * 64
    assert build_appdef("s3://b/j.json", launch.model_copy(update={"image": "mine:1"})).roles[0].image == "mine:1"

    env = {"KUBELLM_S3_SECRET_NAME": "team-s3", "KUBELLM_S3_SECRET_KEYS": "key,secret",
           "KUBELLM_S3_CONFIG_MAP": "ml-kubellm-env"}
    filled = cluster_defaults(ClusterLaunchSettings(), env)
    assert (filled.s3_secret_name, filled.s3_access_key_key, filled.s3_secret_key_key, filled.s3_config_map) == (
        "team-s3", "key", "secret", "ml-kubellm-env")
    mine = cluster_defaults(ClusterLaunchSettings(s3_secret_name="own", s3_config_map="own-env"), env)
    assert (mine.s3_secret_name, mine.s3_access_key_key, mine.s3_config_map) == ("own", "AWS_ACCESS_KEY_ID", "own-env")
    wi = cluster_defaults(ClusterLaunchSettings(s3_workload_identity=True), env)
    assert wi.s3_secret_name is None and wi.s3_config_map == "ml-kubellm-env"
    none = cluster_defaults(ClusterLaunchSettings(), {"KUBELLM_S3_SECRET_NAME": "", "KUBELLM_S3_CONFIG_MAP": ""})
    assert none.s3_secret_name is None and none.s3_config_map is None
    with pytest.raises(ConfigError):
        cluster_defaults(ClusterLaunchSettings(), {"KUBELLM_S3_SECRET_NAME": "Not_A_Name"})
    # the step's image pull Secrets reach the job's pods unless the run config names its own
    pulled = cluster_defaults(ClusterLaunchSettings(), {"KUBELLM_IMAGE_PULL_SECRETS": "regcred, other"})
    assert pulled.image_pull_secrets == ["regcred", "other"]
    own = cluster_defaults(ClusterLaunchSettings(image_pull_secrets=["mine"]), {"KUBELLM_IMAGE_PULL_SECRETS": "regcred"})
    assert own.image_pull_secrets == ["mine"]
    assert cluster_defaults(ClusterLaunchSettings(), {"KUBELLM_IMAGE_PULL_SECRETS": ""}).image_pull_secrets == []


def test_metrics_plot_and_mfu_peak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubellm.training.metrics import MetricsLogger, peak_tflops, plot_loss_curve

    log = MetricsLogger(tmp_path, 3, progress_bar=False)
    for s in range(1, 4):
        log.log(s, {"loss": 5.0 - s, "lr": 1e-3, "tokens_per_s": 100.0 * s, "peak_memory_mb": 10.0 * s})
    log.close()
    assert log.summary()["loss_final"] == 2.0 and log.summary()["peak_memory_mb"] == 30.0
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3
    assert any((tmp_path / "tensorboard").iterdir())
    png = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.delenv("KUBELLM_PEAK_TFLOPS", raising=False)
    assert peak_tflops("cpu", None)[0] is None
    monkeypatch.setenv("KUBELLM_PEAK_TFLOPS", "1.5")
    assert peak_tflops("cpu", None) == (1.5, "$KUBELLM_PEAK_TFLOPS")
    assert peak_tflops("cpu", 2.0)[0] == 2.0


def test_resumed_logger_keeps_each_step_once_in_tensorboard(tmp_path: Path) -> None:
    """A run resumed at step 2 after logging 1-4 re-trains 3-4: TensorBoard shows each step once,
    with the re-trained values (purge_step), as metrics.jsonl does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kubellm.training.metrics import MetricsLogger

    first = MetricsLogger(tmp_path, 4, progress_bar=False)
    for s in range(1, 5):
        first.log(s, {"loss": 10.0 + s})
    first.close()
    resumed = MetricsLogger(tmp_path, 4, progress_bar=False, initial_step=2)
    for s in range(3, 5):
        resumed.log(s, {"loss": 20.0 + s})
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_who_clips_gradients() -> None:
    from kubellm.training.dsconfig import clips_in_kubellm

    dense = ParallelConfig()
    # dense ZeRO-0 with fp32 module grads: kubellm clips (foreach norm, also the logged norm)
    assert clips_in_kubellm(TrainConfig(), dense) and deepspeed_config(TrainConfig(), dense, 1)["gradient_clipping"] == 0
    assert clips_in_kubellm(TrainConfig(precision="bf16"), dense, "cpu")  # autocast over fp32 weights
    # ZeRO 0 with TP or PP too: by the global norm over every rank (DeepSpeed's covers pipe stage 0 only)
    for pc in (ParallelConfig(tp=2), ParallelConfig(pp=2)):
        assert clips_in_kubellm(TrainConfig(), pc) and deepspeed_config(TrainConfig(), pc, 2)["gradient_clipping"] == 0
    # DeepSpeed clips wherever grads are partitioned, loss-scaled or in its bf16 optimizer
    for tc, pc, dev in [(TrainConfig(zero_stage=1), dense, "cpu"), (TrainConfig(zero_stage=1), ParallelConfig(pp=2), "cpu"),
                        (TrainConfig(precision="bf16"), dense, "cuda"), (TrainConfig(precision="fp16"), dense, "cuda")]:
        assert not clips_in_kubellm(tc, pc, dev)
    assert deepspeed_config(TrainConfig(zero_stage=1), dense, 1)["gradient_clipping"] == TrainConfig().optim.grad_clip


def test_out_of_range_optimizer_values_name_the_field() -> None:
    for optim, field, why in [({"betas": [0.9, 1.5]}, "pretrain.train.optim.betas.1", "less than 1"),
                              ({"betas": [-0.1, 0.95]}, "pretrain.train.optim.betas.0", "greater than or equal to 0"),
                              ({"eps": -1}, "pretrain.train.optim.eps", "greater than or equal to 0"),
                              ({"lr": 0}, "pretrain.train.optim.lr", "greater than 0"),
                              ({"weight_decay": -0.1}, "pretrain.train.optim.weight_decay", "greater than or equal"),
                              ({"lr": float("nan")}, "pretrain.train.optim.lr", "finite")]:
        with pytest.raises(ConfigError) as err:
            validate(PretrainConfig, {"train": {"optim": optim}}, "run.yaml", "pretrain")
        assert f"{field}: " in str(err.value) and why in str(err.value), str(err.value)
    # the edges torch accepts are accepted
    edge = validate(PretrainConfig, {"train": {"optim": {"betas": [0.0, 0.999], "eps": 0, "weight_decay": 0}}})
    assert edge.train.optim.betas == (0.0, 0.999) and edge.train.optim.eps == 0


def test_credentials_in_launch_env_are_refused_at_config_time() -> None:
    from kubellm.training.pytorchjob.translate import is_credential_env

    planted = "planted-value-7f3a"
    for key in ("AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "AWS_SESSION_TOKEN", "DB_PASSWORD", "GCP_CREDENTIALS",
                "SSH_PRIVATE_KEY", "WANDB_API_KEY", "aws_access_key_id"):
        assert is_credential_env(key)  # the rule the PyTorchJob translator refuses with
        with pytest.raises(ConfigError) as err:
            validate(PretrainConfig, {"launch": {"env": {"OMP_NUM_THREADS": "1", key: planted}}}, "run.yaml",
                     "pretrain")
        msg = str(err.value)
        assert f"pretrain.launch.env.{key}" in msg and "Kubernetes Secret" in msg and "environment" in msg
        assert planted not in msg  # the refusal never echoes the value
    settings = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MAX_TOKENS": "64"}
    assert not any(is_credential_env(k) for k in settings)
    assert validate(PretrainConfig, {"launch": {"env": settings}}).launch.env == settings


def test_warmup_longer_than_the_run_is_reported() -> None:
    from kubellm.training.optim import schedule_warning

    msg = schedule_warning(OptimConfig(lr=1e-3, warmup_steps=10), max_steps=4)
    assert msg is not None and "train.optim.warmup_steps=10 > train.max_steps=4" in msg and "40%" in msg
    assert schedule_warning(OptimConfig(warmup_steps=4), max_steps=4) is None  # peak reached at the last step
    f = lr_lambda(OptimConfig(warmup_steps=4), max_steps=4)
    assert f(3) == 1.0


def test_local_torchrun_refuses_several_nodes_at_config_time() -> None:
    with pytest.raises(ConfigError, match=r"pretrain.launch: .*launch.nnodes=2 .*backend: pytorchjob"):
        validate(PretrainConfig, {"launch": {"nnodes": 2}}, "run.yaml", "pretrain")
    # a cluster job, or TorchX's local_cwd (one local replica per node, rendezvous on localhost), is fine
    assert LaunchConfig(backend="pytorchjob", nnodes=2).nnodes == 2
    assert LaunchConfig(scheduler="local_cwd", nnodes=2).nnodes == 2


def test_pg_timeout_comes_from_the_pytorchjob_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """KUBELLM_PG_TIMEOUT_S (exported from `pg_timeout_s`) reaches the process group; it had been ignored."""
    import datetime

    from kubellm.training.process_group import pg_timeout

    monkeypatch.delenv("KUBELLM_PG_TIMEOUT_S", raising=False)
    assert pg_timeout() == datetime.timedelta(seconds=600)
    monkeypatch.setenv("KUBELLM_PG_TIMEOUT_S", "1800")
    assert pg_timeout() == datetime.timedelta(seconds=1800)
    monkeypatch.setenv("KUBELLM_PG_TIMEOUT_S", "ten")
    with pytest.raises(ConfigError, match="KUBELLM_PG_TIMEOUT_S='ten'"):
        pg_timeout()


def test_checkpoints_stage_on_the_pytorchjob_staging_volume(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kubellm.training.checkpoint import CheckpointManager

    monkeypatch.delenv("KUBELLM_CHECKPOINT_STAGING", raising=False)
    monkeypatch.setenv("KUBELLM_STAGING_DIR", str(tmp_path / "vol"))
    mgr = CheckpointManager(str(tmp_path / "run" / "checkpoints"))
    assert (tmp_path / "vol" / "kubellm-ckpt") in mgr.local_dir.parents  # not the root disk's /tmp


def test_zero_buffers_are_sized_from_the_model() -> None:
    """DeepSpeed's reduce bucket defaults to 5e8 elements (1 GiB of bf16 per GPU whatever the model):
    kubellm asks for dim² elements, within [2^20, the model's parameters], and ZeRO-3 keeps whole only
    parameters below 10·dim elements. `kubellm plan` counts the bucket with the gradients."""
    from kubellm.model.config import get_preset
    from kubellm.model.flops import num_params
    from kubellm.training.dsconfig import BUCKET_MIN, zero_buffer_sizes
    from kubellm.training.planner import model_state_bytes

    big, small, tiny = get_preset("7b"), get_preset("seed"), get_preset("debug")
    assert zero_buffer_sizes(big) == {"reduce_bucket_size": 4096**2, "stage3_param_persistence_threshold": 40960}
    assert zero_buffer_sizes(small)["reduce_bucket_size"] == BUCKET_MIN  # 128² is below the floor
    assert zero_buffer_sizes(tiny)["reduce_bucket_size"] == num_params(tiny) < BUCKET_MIN  # never above Ψ
    for stage in (0, 1, 3):
        zero = deepspeed_config(TrainConfig(zero_stage=stage), ParallelConfig(), 1, model_cfg=big)["zero_optimization"]
        assert zero.get("reduce_bucket_size") == (None if stage == 0 else 4096**2)
        assert zero.get("stage3_param_persistence_threshold") == (40960 if stage == 3 else None)
    assert "reduce_bucket_size" not in deepspeed_config(TrainConfig(zero_stage=1), ParallelConfig(), 1)["zero_optimization"]
    # the planner: ZeRO ≥ 1 adds the bucket in the gradients' dtype, ZeRO 0 has none
    psi, bucket = 1e9, 4096**2
    for zero in (0, 1, 2, 3):
        with_b = model_state_bytes(psi, zero, 8, "bf16", bucket=bucket)
        without = model_state_bytes(psi, zero, 8, "bf16")
        assert with_b[1] - without[1] == (0 if zero == 0 else 2 * bucket)
        assert (with_b[0], with_b[2]) == (without[0], without[2])


def test_a_resume_restores_the_configured_optimizer_hyperparameters() -> None:
    """A checkpoint's optimizer and scheduler state carry its lr/betas/eps/weight decay; after loading
    them the run's config applies again, at the schedule position (and with the moments) saved."""
    import torch

    from kubellm.training.optim import configured_hyperparameters, restore_hyperparameters

    def build(cfg: OptimConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, 10))

    old = OptimConfig(lr=1e-3, warmup_steps=2, weight_decay=0.1)
    opt, sched = build(old)
    for _ in range(3):
        for p in (q for g in opt.param_groups for q in g["params"]):
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    saved = (opt.state_dict(), sched.state_dict())

    for new, expect in [(old, []),
                        (OptimConfig(lr=2e-3, warmup_steps=2, weight_decay=0.05, betas=(0.9, 0.99), eps=1e-6),
                         ["lr 0.001 -> 0.002", "betas (0.9, 0.95) -> (0.9, 0.99)", "eps 1e-08 -> 1e-06",
                          "weight_decay 0.1 -> 0.05"])]:
        opt2, sched2 = build(new)
        configured = configured_hyperparameters(sched2)
        opt2.load_state_dict(saved[0])
        sched2.load_state_dict(saved[1])
        assert opt2.param_groups[0]["lr"] == pytest.approx(old.lr * lr_lambda(old, 10)(3))  # the saved values
        assert restore_hyperparameters(sched2, configured) == expect
        want_lr = new.lr * lr_lambda(new, 10)(3)  # the configured schedule at the saved position
        assert sched2.get_last_lr() == pytest.approx([want_lr, want_lr])
        assert [g["lr"] for g in opt2.param_groups] == pytest.approx([want_lr, want_lr])
        assert [g["weight_decay"] for g in opt2.param_groups] == [new.weight_decay, 0.0]  # norms never decay
        assert all(tuple(g["betas"]) == new.betas and g["eps"] == new.eps for g in opt2.param_groups)
        assert opt2.state_dict()["state"][0]["step"] == 3  # the moments are the checkpoint's
        sched2.step()
        assert sched2.get_last_lr()[0] == pytest.approx(new.lr * lr_lambda(new, 10)(4))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_cpu_peak_memory_is_the_workers_own_not_its_parents() -> None:
    """A worker forked from a larger process (a launcher, pytest) reported the parent's RSS as its peak:
    `ru_maxrss` counts the memory the child started as a copy of."""
    import subprocess
    import sys

    parent = bytearray(768 * 2**20)
    parent[:: 4096] = b"\1" * len(parent[:: 4096])  # resident
    code = "from kubellm.training.metrics import peak_memory_mb; print(peak_memory_mb('cpu'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 0 < float(out.strip().splitlines()[-1]) < 600, out  # importing torch takes a few hundred MB, not 768
    del parent
