"""Exact resume and bad checkpoints, through the real DeepSpeed engine in 2 gloo processes on CPU.

    .venv/bin/python -m pytest tests/training/test_checkpoint_resume.py -q
    # the worker alone (2 processes):
    torchrun --nproc_per_node 2 tests/training/test_checkpoint_resume.py --worker OUT_DIR RUN_ROOT

One launch of 2 processes runs, for ZeRO 0, 1, 2 and 3: an uninterrupted run of 6 steps that saves
at steps 2, 4 and 6 (keep=2), then a *fresh* engine (other init seed, scrambled RNGs) that loads the
step-4 checkpoint and trains steps 5–6. The losses must match bitwise: same ops, same order, the
same 2-rank gloo all-reduce, and every input to a step (weights, Adam moments, LR schedule, data
position, torch/numpy/python RNG) restored exactly. The training step deliberately draws from all
three RNGs (a random token mask and a loss weight) so an unrestored RNG shows up as a loss
difference. ZeRO 1 runs against the moto S3 server; the others against a local directory.
The bad-input cases run on the ZeRO-1 (S3) checkpoints after the resume check.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

STAGES = (0, 1, 2, 3)
BF16_STAGES = (1, 3)  # bf16 mixed precision: BF16 ZeRO shards (`bf16_zero_pp_rank_*`), fp32 masters
VARIANTS = [(s, "fp32") for s in STAGES] + [(s, "bf16") for s in BF16_STAGES]
S3_STAGE = 1
STEPS = 6
SAVE_AT = (2, 4, 6)
RESUME_FROM = 4


# ------------------------------------------------------------------ worker (runs in 2 processes)


def _worker(out_dir: str, run_root: str, s3_root: str) -> None:
    import random
    import time

    import deepspeed
    import numpy as np
    import torch
    import torch.distributed as dist

    from kubellm.core.errors import IntegrityError
    from kubellm.core.manifest import MANIFEST_NAME
    from kubellm.core.storage import join, storage_for
    from kubellm.model import Transformer
    from kubellm.model.config import ModelConfig
    from kubellm.model.loss import causal_lm_loss
    from kubellm.training.checkpoint import CheckpointManager, CheckpointMismatchError

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    cfg = ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)
    results: dict = {"rank": rank}

    class TokenStream:
        """Deterministic synthetic tokens: batch i of dp rank r is a pure function of (i, r)."""

        def __init__(self, dp_rank: int) -> None:
            self.dp_rank, self.position = dp_rank, 0

        def __next__(self) -> dict:
            g = torch.Generator().manual_seed(1000 * self.position + self.dp_rank)
            base = torch.randint(0, cfg.vocab_size, (2, 1), generator=g)
            ids = (base + torch.arange(cfg.max_seq_len + 1) * 3) % cfg.vocab_size  # learnable pattern
            self.position += 1
            return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

        def state_dict(self) -> dict:
            return {"position": self.position, "dp_rank": self.dp_rank}

        def load_state_dict(self, sd: dict) -> None:
            self.position = int(sd["position"])

    def build(stage: int, seed: int, precision: str):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        model = Transformer(cfg)
        ds_cfg = {
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0, "steps_per_print": 10**6,
            "bf16": {"enabled": precision == "bf16"},
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1, "torch_adam": True}},
            "scheduler": {"type": "WarmupDecayLR",
                          "params": {"total_num_steps": STEPS, "warmup_num_steps": 2, "warmup_max_lr": 3e-3}},
        }
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
        return engine

    def step(engine, loader) -> float:
        batch = next(loader)
        ids = batch["input_ids"].clone()
        ids[torch.rand(ids.shape) < 0.1] = 0  # torch RNG: token dropout
        weight = 1.0 + 0.01 * (random.random() + float(np.random.rand()))  # python + numpy RNG
        loss = causal_lm_loss(engine(ids), batch["labels"]) * weight
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    for stage, precision in VARIANTS:
        name = f"z{stage}" if precision == "fp32" else f"z{stage}_{precision}"
        on_s3 = stage == S3_STAGE and precision == "fp32"
        prefix = join(s3_root if on_s3 else run_root, name)
        mgr = CheckpointManager(prefix, keep=2, local_dir=Path(out_dir) / "staging")
        # run A: uninterrupted
        print(f"[ckpt-test] {time.strftime('%T')} rank {rank} {name}: run A", flush=True)
        engine = build(stage, seed=0, precision=precision)
        loader = TokenStream(engine.global_rank)
        losses_a = []
        for s in range(1, STEPS + 1):
            losses_a.append(step(engine, loader))
            if s in SAVE_AT:
                mgr.save(engine, s, {"loader": loader.state_dict(), "step": s})
        committed = [m.metadata["step"] for m in mgr.committed()]
        full = mgr.consolidated_state_dict(engine)
        ref = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()} if stage < 3 else None
        if rank == 0:
            results[f"{name}_consolidated_keys"] = sorted(full)
            results[f"{name}_consolidated_dtypes"] = sorted({str(v.dtype) for v in full.values()})
            if ref is not None:
                results[f"{name}_consolidated_max_diff"] = max(
                    float((full[k] - ref[k]).abs().max()) for k in ref)
            results[f"{name}_consolidated"] = {k: v.sum().item() for k, v in full.items()}
            # fp32 masters, not the bf16 module copy: some values are not representable in bf16
            results[f"{name}_not_bf16_rounded"] = any(
                bool((v != v.bfloat16().float()).any()) for v in full.values())
        del engine

        # run B: fresh engine, other init, scrambled RNGs, resumed from step RESUME_FROM
        print(f"[ckpt-test] {time.strftime('%T')} rank {rank} {name}: run B", flush=True)
        engine = build(stage, seed=999, precision=precision)
        target = next(m for m in mgr.committed() if m.metadata["step"] == RESUME_FROM)
        client_state = mgr.load(engine, manifest=target)
        loader = TokenStream(engine.global_rank)
        loader.load_state_dict(client_state["loader"])
        losses_b = [step(engine, loader) for _ in range(RESUME_FROM + 1, STEPS + 1)]
        results[name] = {
            "losses_a": losses_a, "losses_b": losses_b, "committed": committed,
            "client_state": client_state, "global_steps": int(engine.global_steps),
            "manifest_meta": {k: target.metadata[k] for k in ("step", "layout", "model_config", "precision")},
            "client_state_by_rank": target.metadata["client_state_by_rank"],
            "safe_engine": type(engine.checkpoint_engine).__name__,
            "safe_loads": len(engine.checkpoint_engine.loaded),
        }
        if on_s3:
            results["bad"] = _bad_inputs(engine, mgr, cfg, prefix, results, IntegrityError,
                                         CheckpointMismatchError, MANIFEST_NAME, storage_for, join)
        del engine

    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()


def _bad_inputs(engine, mgr, cfg, prefix, results, IntegrityError, CheckpointMismatchError,  # noqa: N803
                MANIFEST_NAME, storage_for, join) -> dict:  # noqa: N803
    """Each case must fail on every rank with a message naming the file, and never modify what is
    committed; a torn checkpoint must be skipped in favour of the newest committed one."""
    st = storage_for(prefix)
    out: dict = {}
    newest = mgr.latest()
    snapshot = {o.relpath: st.read_bytes(o.uri) for o in st.list(prefix)}
    safe = engine.checkpoint_engine

    def expect(exc_type, fn) -> str:
        try:
            fn()
        except exc_type as e:
            return str(e)
        raise AssertionError(f"expected {exc_type.__name__}")

    # another model shape: the manifest's model config is compared field by field
    wrong = type(mgr)(prefix, keep=2, local_dir=mgr.local_dir.parent, model_config=cfg.with_(dim=48, n_heads=4))
    out["shape"] = expect(CheckpointMismatchError, lambda: wrong.load(engine))
    # another world size / layout: forged metadata, so the check must come before any download
    forged = newest.model_copy(deep=True)
    forged.metadata["layout"] = {**forged.metadata["layout"], "world_size": 4, "dp": 4}
    out["layout"] = expect(CheckpointMismatchError, lambda: mgr.load(engine, manifest=forged))
    out["unchanged_after_mismatch"] = {o.relpath: st.read_bytes(o.uri) for o in st.list(prefix)} == snapshot

    # torn checkpoint: files of a later step uploaded, no manifest -> the committed one is used
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0  # one rank mutates storage; the barrier publishes it to the other
    dist.barrier()  # both ranks have taken their "unchanged" snapshot before anything is written
    torn = join(prefix, "step-00000099")
    if rank0:
        for f in newest.files:
            st.write_bytes(join(torn, f.path), st.read_bytes(newest.file_uri(f.path)))
    dist.barrier()
    out["latest_with_torn"] = mgr.latest().metadata["step"]
    mgr.load(engine)
    out["loaded_with_torn"] = mgr.last_loaded.metadata["step"]

    # a wrong hash: one byte of rank 1's optimizer shard flipped after commit
    shard = next(f.path for f in newest.files if "zero_pp_rank_1_" in f.path and "optim" in f.path)
    data = bytearray(st.read_bytes(newest.file_uri(shard)))
    data[len(data) // 2] ^= 0xFF
    if rank0:
        st.write_bytes(newest.file_uri(shard), bytes(data))
    dist.barrier()
    before = len(safe.loaded)
    out["corrupt"] = expect(IntegrityError, lambda: mgr.load(engine))
    out["unpickled_after_corrupt"] = len(safe.loaded) - before
    out["corrupt_shard"] = shard

    # a listed file missing from storage
    if rank0:
        st.delete(newest.file_uri(shard))
    dist.barrier()
    out["missing"] = expect(IntegrityError, lambda: mgr.load(engine))
    out["manifest_untouched"] = st.read_bytes(join(newest.uri, MANIFEST_NAME)) == snapshot[
        f"{newest.uri.rsplit('/', 1)[-1]}/{MANIFEST_NAME}"]
    return out


# ------------------------------------------------------------------ the pytest side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def resume_run(tmp_path_factory: pytest.TempPathFactory, s3_server: str) -> list[dict]:
    import uuid

    from kubellm.core.storage import reset_clients, s3_client

    out = tmp_path_factory.mktemp("ckpt_resume")
    env = {**os.environ, "KUBELLM_S3_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".cache/torch_extensions"))
    bucket = f"ckpt-{uuid.uuid4().hex[:10]}"
    with pytest.MonkeyPatch.context() as mp:
        for k in ("KUBELLM_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
            mp.setenv(k, env[k])
        reset_clients()
        s3_client().create_bucket(Bucket=bucket)
    reset_clients()
    procs = [
        subprocess.Popen([sys.executable, __file__, "--worker", str(out), str(out / "runs"), f"s3://{bucket}/runs"],
                         env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.integration
@pytest.mark.parametrize(("stage", "precision"), VARIANTS)
def test_resume_is_bitwise_exact(resume_run: list[dict], stage: int, precision: str) -> None:
    for res in resume_run:
        r = res[f"z{stage}" if precision == "fp32" else f"z{stage}_{precision}"]
        tail = r["losses_a"][RESUME_FROM:]
        assert r["losses_b"] == tail, f"ZeRO-{stage} rank {res['rank']}: resumed {r['losses_b']} != {tail}"
        assert r["losses_a"][-1] < r["losses_a"][0]  # it trains at all
        assert r["global_steps"] == STEPS
        assert r["client_state"] == {"loader": {"position": RESUME_FROM, "dp_rank": res["rank"]},
                                     "step": RESUME_FROM}
        assert r["committed"] == [4, 6]  # keep=2: step 2 deleted after step 6 committed
        assert r["safe_engine"] == "SafeTorchCheckpointEngine" and r["safe_loads"] >= 1
        assert r["manifest_meta"]["layout"] == {"world_size": 2, "dp": 2, "tp": 1, "pp": 1, "zero_stage": stage}
        assert r["manifest_meta"]["model_config"]["dim"] == 32
        assert r["manifest_meta"]["precision"] == precision
        assert [s["loader"]["dp_rank"] for s in r["client_state_by_rank"]] == [0, 1]


@pytest.mark.integration
@pytest.mark.parametrize("stage", STAGES)
def test_consolidated_state_dict_any_zero_stage(resume_run: list[dict], stage: int) -> None:
    r0 = resume_run[0]
    assert r0[f"z{stage}_consolidated_dtypes"] == ["torch.float32"]
    assert r0[f"z{stage}_consolidated_keys"] == r0["z0_consolidated_keys"]
    assert r0[f"z{stage}_not_bf16_rounded"]
    if stage < 3:  # fp32 training: the module's weights are the master weights
        assert r0[f"z{stage}_consolidated_max_diff"] == 0.0
    # every stage trained the same model on the same data: same weights up to reduction order
    for k, v in r0[f"z{stage}_consolidated"].items():
        assert v == pytest.approx(r0["z0_consolidated"][k], rel=1e-4, abs=1e-4), k


@pytest.mark.integration
@pytest.mark.parametrize("stage", BF16_STAGES)
def test_consolidated_state_dict_bf16_is_fp32_master(resume_run: list[dict], stage: int) -> None:
    r0 = resume_run[0]
    name = f"z{stage}_bf16"
    assert r0[f"{name}_consolidated_dtypes"] == ["torch.float32"]
    assert r0[f"{name}_consolidated_keys"] == r0["z0_consolidated_keys"]
    assert r0[f"{name}_not_bf16_rounded"]  # the optimizer's fp32 masters, not the bf16 weights


@pytest.mark.integration
def test_bad_checkpoints_fail_clearly_and_change_nothing(resume_run: list[dict]) -> None:
    for res in resume_run:
        bad = res["bad"]
        assert "dim: checkpoint=32, this run=48" in bad["shape"] and "_manifest.json" in bad["shape"]
        assert "world_size: checkpoint=4, this run=2" in bad["layout"]
        assert "ds_to_universal" in bad["layout"] and "consolidated export" in bad["layout"]
        assert bad["unchanged_after_mismatch"]
        assert bad["latest_with_torn"] == 6 and bad["loaded_with_torn"] == 6
        assert bad["corrupt_shard"] in bad["corrupt"] and "sha256" in bad["corrupt"]
        assert bad["unpickled_after_corrupt"] == 0  # refused before torch.load
        assert bad["corrupt_shard"] in bad["missing"] and "missing" in bad["missing"]
        assert bad["manifest_untouched"]


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], sys.argv[3], sys.argv[4])
    import torch.distributed as _dist

    _dist.destroy_process_group()  # as kubellm's worker does: not left to interpreter teardown
    print("[ckpt-test] results written, process group destroyed", flush=True)
    # Every check this worker makes is in its results file, written above. Two full CI runs saw a
    # finished rank abort during interpreter finalization ("terminate called without an active
    # exception", C++ destructors of DeepSpeed/gloo state), never reproduced alone or under load; the
    # marker above shows whether an abort came after the work. Skip finalization: a failure before
    # this point still exits non-zero.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
