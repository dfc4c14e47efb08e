"""The engine in one process (spawned: a clean process group) and the pretrain stage end to end.

Integration tests launch the stage with 2 torchrun processes and check that a failing rank's
traceback reaches the caller.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kubellm.core.manifest import publish_dir
from kubellm.training.spawn import spawn


def make_tokens_artifact(root: Path, vocab: int = 256, shard_vocab: int | None = None) -> str:
    from kubellm.tokenizer.shards import TokenShardWriter

    rng = np.random.default_rng(0)
    src = root / "tok_src"
    with TokenShardWriter(src / "train/part-00000.tok", shard_vocab or vocab) as w:
        for _ in range(200):
            n, start = int(rng.integers(10, 60)), int(rng.integers(3, vocab))
            w.add_document([1, *((start + np.arange(n) * 3) % (vocab - 3) + 3), 2])
    m = publish_dir(src, str(root / "out/tokenizer/abc"), kind="token_shards",
                    metadata={"vocab_size": vocab, "bos_id": 1, "eos_id": 2, "pad_id": 0})
    return m.uri


def engine_runs(shards: list[str], run_root: str) -> dict:
    import torch

    from kubellm.model import Transformer
    from kubellm.model.config import get_preset
    from kubellm.pretrain.objective import PretrainObjective
    from kubellm.training.config import OptimConfig, ParallelConfig, TrainConfig
    from kubellm.training.engine import seed_everything, train
    from kubellm.training.optim import lr_lambda

    cfg = get_preset("debug").with_(vocab_size=256, max_seq_len=64)
    out: dict = {}
    for name, extra in [("fp32", {}), ("ac", {"activation_checkpointing": True}), ("bf16", {"precision": "bf16"}),
                        ("compiled", {"compile": True})]:
        tc = TrainConfig(max_steps=8, micro_batch_size=2, global_batch_size=4, seq_len=32, progress_bar=False,
                         optim=OptimConfig(lr=3e-3, warmup_steps=3), checkpoint_every=0, **extra)
        r = train(cfg, tc, ParallelConfig(), PretrainObjective(shards, seq_len=32, vocab_size=256),
                  f"{run_root}/{name}", resume=False)
        out[name] = r.losses
        if name == "compiled":
            assert r.final_state_dict is not None
            out["compiled_keys"] = sorted(r.final_state_dict)
        if name == "fp32":
            seed_everything(tc.seed)
            init = Transformer(cfg).state_dict()
            assert r.final_state_dict is not None
            out["changed"] = [k for k, v in init.items() if not torch.equal(v, r.final_state_dict[k])]
            out["n_params"] = len(init)
            out["keys"] = sorted(r.final_state_dict)
            rows = [json.loads(x) for x in Path(r.metrics_path).read_text().splitlines()]
            out["rows"] = rows
            f = lr_lambda(tc.optim, tc.max_steps)
            out["expected_lr"] = [3e-3 * f(s) for s in range(8)]
    return out


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tokens_artifact(tmp_path_factory.mktemp("tok"))


def test_engine_trains_and_options_agree(tokens: str, tmp_path: Path) -> None:
    shards = [str(Path(tokens) / "train/part-00000.tok")]
    out = spawn(engine_runs, 1, shards, str(tmp_path))[0]
    fp32, ac, bf16 = out["fp32"], out["ac"], out["bf16"]
    assert all(np.isfinite(fp32)) and fp32[-1] < fp32[0] - 0.3  # loss falls
    assert len(out["changed"]) == out["n_params"]  # every parameter tensor moved
    np.testing.assert_allclose(ac, fp32, rtol=1e-6)  # recomputation changes memory, not numerics
    np.testing.assert_allclose(bf16, fp32, rtol=3e-2)  # autocast: same trajectory within bf16 rounding
    np.testing.assert_allclose(out["compiled"], fp32, rtol=1e-4)  # train.compile: same numerics, fused kernels
    assert out["compiled_keys"] == out["keys"]  # Module.compile keeps parameter names (checkpoints, export)
    rows = out["rows"]
    assert [r["step"] for r in rows] == list(range(1, 9))
    # row s logs the lr step s's update used: the schedule after s - 1 applied steps
    np.testing.assert_allclose([r["lr"] for r in rows], out["expected_lr"], rtol=1e-9)
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
    assert rows[-1]["tokens_seen"] == 8 * 4 * 32


def resume_runs(shards: list[str], run_root: str) -> dict:
    import os
    import shutil

    from kubellm.core.errors import ConfigError
    from kubellm.model.config import get_preset
    from kubellm.pretrain.objective import PretrainObjective
    from kubellm.training.checkpoint import tag_for
    from kubellm.training.config import OptimConfig, ParallelConfig, TrainConfig
    from kubellm.training.engine import train

    cfg = get_preset("debug").with_(vocab_size=256, max_seq_len=64)

    def run(name: str, max_steps: int = 6):  # noqa: ANN202
        tc = TrainConfig(max_steps=max_steps, micro_batch_size=2, global_batch_size=4, seq_len=32,
                         progress_bar=False, tensorboard=False, checkpoint_every=2,
                         optim=OptimConfig(lr=3e-3, warmup_steps=2))
        return train(cfg, tc, ParallelConfig(), PretrainObjective(shards, seq_len=32, vocab_size=256),
                     f"{run_root}/{name}", resume=True)

    def rows(name: str) -> list[dict]:
        path = Path(run_root, name, "metrics.jsonl")
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    ref = run("ref")
    out: dict = {"ref": {"summary": ref.summary, "rows": rows("ref")}}
    # steps 5-6 trained and logged, then the process died before step 6's checkpoint committed; on
    # "new_node" the resumed rank 0 also lacks the earlier metrics.jsonl (another pod, an S3 run dir)
    for name, metrics_lost in (("crash", False), ("new_node", True)):
        run(name)
        shutil.rmtree(Path(run_root, name, "checkpoints", tag_for(6)))
        if metrics_lost:
            os.remove(Path(run_root, name, "metrics.jsonl"))
        r = run(name)
        out[name] = {"start": r.start_step, "summary": r.summary, "rows": rows(name), "losses": r.losses}
    # resumed from its final checkpoint (e.g. the export failed): nothing left to train, same totals
    r = run("crash")
    out["final"] = {"start": r.start_step, "summary": r.summary, "losses": r.losses, "rows": rows("crash")}
    try:  # a checkpoint beyond the configured length is refused, not published as this config's model
        run("crash", max_steps=2)
    except ConfigError as e:
        out["too_far"] = str(e)
    out["rows_after_refusal"] = rows("crash")
    return out


def test_resume_keeps_run_totals_and_logs_each_step_once(tokens: str, tmp_path: Path) -> None:
    shards = [str(Path(tokens) / "train/part-00000.tok")]
    out = spawn(resume_runs, 1, shards, str(tmp_path))[0]
    ref, crash, new_node, final = out["ref"], out["crash"], out["new_node"], out["final"]
    ref_losses = [r["loss"] for r in ref["rows"]]
    assert crash["start"] == new_node["start"] == 4 and crash["losses"] == ref_losses[4:]  # exact resume
    # each step once in metrics.jsonl: the rows of steps 5-6 from before the crash were replaced
    assert [r["step"] for r in crash["rows"]] == list(range(1, 7))
    assert [r["loss"] for r in crash["rows"]] == ref_losses
    assert [r["tokens_seen"] for r in crash["rows"]] == [r["tokens_seen"] for r in ref["rows"]]
    assert [r["step"] for r in new_node["rows"]] == [5, 6]
    for resumed in (crash, new_node, final):  # the whole run's totals, as the uninterrupted run reports
        s = resumed["summary"]
        assert s["tokens_seen"] == ref["summary"]["tokens_seen"] == 6 * 4 * 32
        assert s["loss_start"] == ref["summary"]["loss_start"] and s["loss_final"] == ref["summary"]["loss_final"]
        assert s["steps"] == 6
    assert final["start"] == 6 and final["losses"] == [] and final["rows"] == crash["rows"]
    assert "checkpoint at step 6 > train.max_steps=2" in out["too_far"]
    assert "checkpoints" in out["too_far"] and "train.max_steps ≥ 6" in out["too_far"]
    assert out["rows_after_refusal"] == crash["rows"]


def lr_change_runs(shards: list[str], run_root: str) -> dict:
    """Train 4 of 6 steps, then resume to 6 with train.optim.lr doubled, at ZeRO 0 and 1."""
    from kubellm.model.config import get_preset
    from kubellm.pretrain.objective import PretrainObjective
    from kubellm.training.config import OptimConfig, ParallelConfig, TrainConfig
    from kubellm.training.engine import train
    from kubellm.training.optim import lr_lambda

    cfg = get_preset("debug").with_(vocab_size=256, max_seq_len=64)
    out: dict = {}
    for zero in (0, 1):
        for max_steps, lr in ((4, 3e-3), (6, 6e-3)):
            tc = TrainConfig(max_steps=max_steps, micro_batch_size=2, global_batch_size=4, seq_len=32,
                             progress_bar=False, tensorboard=False, checkpoint_every=2, zero_stage=zero,
                             optim=OptimConfig(lr=lr, warmup_steps=2))
            r = train(cfg, tc, ParallelConfig(), PretrainObjective(shards, seq_len=32, vocab_size=256),
                      f"{run_root}/z{zero}", resume=True)
        rows = [json.loads(x) for x in Path(run_root, f"z{zero}", "metrics.jsonl").read_text().splitlines()]
        out[zero] = {"start": r.start_step, "lr": {row["step"]: row["lr"] for row in rows},
                     "expected": [lr * lr_lambda(tc.optim, 6)(s) for s in (4, 5)]}
    return out


def test_a_resume_trains_with_the_configured_lr_not_the_checkpoints(tokens: str, tmp_path: Path) -> None:
    shards = [str(Path(tokens) / "train/part-00000.tok")]
    out = spawn(lr_change_runs, 1, shards, str(tmp_path))[0]
    for zero in (0, 1):
        got = out[zero]
        assert got["start"] == 4
        # steps 5-6 use the doubled lr's schedule at the saved position (before: the checkpoint's 3e-3)
        assert [got["lr"][5], got["lr"][6]] == pytest.approx(got["expected"], rel=1e-9)
        assert got["lr"][4] < got["lr"][5]  # steps 1-4 ran at the old lr


def s3_resume_rows(shards: list[str], run_dir: str, pods: list[str]) -> dict:
    """Train 6 steps with an S3 run dir, lose the step-6 checkpoint, resume "on another pod" (a fresh
    node-local cache dir): the log of steps 1-4 comes back from the run dir."""
    import os

    from kubellm.core.storage import storage_for
    from kubellm.model.config import get_preset
    from kubellm.pretrain.objective import PretrainObjective
    from kubellm.training.checkpoint import tag_for
    from kubellm.training.config import OptimConfig, ParallelConfig, TrainConfig
    from kubellm.training.engine import train
    from kubellm.training.runfiles import local_work_dir

    cfg = get_preset("debug").with_(vocab_size=256, max_seq_len=64)
    tc = TrainConfig(max_steps=6, micro_batch_size=2, global_batch_size=4, seq_len=32, progress_bar=False,
                     tensorboard=True, checkpoint_every=2, optim=OptimConfig(lr=3e-3, warmup_steps=2))
    out: dict = {}
    for i, pod in enumerate(pods):
        os.environ["KUBELLM_CACHE_DIR"] = pod
        r = train(cfg, tc, ParallelConfig(), PretrainObjective(shards, seq_len=32, vocab_size=256), run_dir,
                  resume=True)
        path = local_work_dir(run_dir) / "metrics.jsonl"
        out[f"run{i}"] = {"start": r.start_step, "steps": [json.loads(x)["step"] for x in path.read_text().splitlines()],
                          "losses": [json.loads(x)["loss"] for x in path.read_text().splitlines()],
                          "tb_files": len(list((path.parent / "tensorboard").glob("events.out.tfevents.*")))}
        if i == 0:
            st = storage_for(run_dir)
            out["uploaded"] = st.exists(f"{run_dir}/metrics.jsonl")
            for o in st.list(f"{run_dir}/checkpoints/{tag_for(6)}"):
                st.delete(o.uri)
    return out


def test_a_resume_on_another_pod_keeps_the_s3_run_dirs_earlier_metrics(tokens: str, s3_bucket: str,
                                                                        tmp_path: Path) -> None:
    shards = [str(Path(tokens) / "train/part-00000.tok")]
    out = spawn(s3_resume_rows, 1, shards, f"{s3_bucket}/runs/r1", [str(tmp_path / "pod-a"), str(tmp_path / "pod-b")])[0]
    assert out["uploaded"]  # metrics.jsonl reaches the run dir at each checkpoint, not only at publish
    first, resumed = out["run0"], out["run1"]
    assert first["start"] == 0 and resumed["start"] == 4
    assert resumed["steps"] == [1, 2, 3, 4, 5, 6]  # before: [5, 6], the earlier rows were on the lost pod
    assert resumed["losses"] == first["losses"]
    assert first["tb_files"] == 1 and resumed["tb_files"] == 2  # the first pod's events came back beside the new ones


def stage_in_process(tokens: str, output: str) -> dict:
    from kubellm.core.config import validate
    from kubellm.pretrain.config import PretrainConfig
    from kubellm.pretrain.stage import run

    cfg = validate(PretrainConfig, {"model": {"preset": "debug", "overrides": {"vocab_size": 256, "max_seq_len": 64}},
                                    "train": {"max_steps": 6, "micro_batch_size": 2, "global_batch_size": 4,
                                              "seq_len": 32, "progress_bar": False}})
    return json.loads(run(cfg, {"tokens": tokens}, output).to_json())


def test_pretrain_stage_exports_a_loadable_model(tokens: str, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    m = spawn(stage_in_process, 1, tokens, str(tmp_path))[0]
    assert m["kind"] == "model" and m["metadata"]["export_path"] == "hf"
    assert m["metrics"]["loss_final"] < m["metrics"]["loss_start"]
    assert m["metadata"]["model_config"]["vocab_size"] == 256
    files = {f["path"] for f in m["files"]}
    assert {"hf/model.safetensors", "hf/config.json", "metrics/metrics.jsonl", "metrics/loss_curve.png"} <= files
    assert "loss_curve.png" in m["report_markdown"]
    hf = AutoModelForCausalLM.from_pretrained(Path(m["uri"]) / "hf")
    logits = hf(torch.tensor([[1, 5, 8, 11]])).logits
    assert logits.shape == (1, 4, 256) and torch.isfinite(logits).all()
    # re-running the same config on the same data returns the committed artifact (content address)
    from kubellm.core.config import validate  # noqa: F401
    assert (Path(m["uri"]) / "_manifest.json").exists()


def _pretrain_cfg(nproc: int, **train: object):
    from kubellm.core.config import validate
    from kubellm.pretrain.config import PretrainConfig

    return validate(PretrainConfig, {
        "model": {"preset": "debug", "overrides": {"vocab_size": 256, "max_seq_len": 64}},
        "train": {"max_steps": 6, "micro_batch_size": 2, "global_batch_size": 4, "seq_len": 32,
                  "zero_stage": 2, "progress_bar": False, **train},
        "parallel": {"dp": nproc}, "launch": {"nproc_per_node": nproc}})


@pytest.mark.integration
def test_pretrain_stage_launches_two_processes(tokens: str, tmp_path: Path) -> None:
    from kubellm.pretrain.stage import run

    m = run(_pretrain_cfg(2), {"tokens": tokens}, str(tmp_path))
    assert m.kind == "model" and m.counts["world_size"] == 2 and m.counts["steps"] == 6
    assert m.metrics["loss_final"] < m.metrics["loss_start"]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "result.json").exists()


@pytest.mark.integration
def test_failing_rank_fails_the_stage_with_its_traceback(tmp_path: Path) -> None:
    from kubellm.pretrain.stage import run
    from kubellm.training.job import TrainingFailedError

    # the shard holds ids up to 299 (its vocab 300) but the model has 256 embeddings; the manifest's
    # metadata does not say so, so only the workers' shard check can catch it
    bad = make_tokens_artifact(tmp_path, vocab=256, shard_vocab=300)
    with pytest.raises(TrainingFailedError) as e:
        run(_pretrain_cfg(2), {"tokens": bad}, str(tmp_path / "out2"))
    msg = str(e.value)
    assert "pretrain training failed" in msg and "rank" in msg
    assert "part-00000.tok: shard vocab_size 300 exceeds the model's vocab_size 256" in msg


def retention_fails(shards: list[str], run_root: str) -> dict:
    from kubellm.model.config import get_preset
    from kubellm.pretrain.objective import PretrainObjective
    from kubellm.training.checkpoint import CheckpointManager
    from kubellm.training.config import ParallelConfig, TrainConfig
    from kubellm.training.engine import train

    def broken(self: object, manifest: object) -> None:
        raise OSError("simulated: cannot delete an old checkpoint")

    CheckpointManager._retain = broken  # type: ignore[method-assign]  # this process only (spawned)
    cfg = get_preset("debug").with_(vocab_size=256, max_seq_len=64)
    tc = TrainConfig(max_steps=3, micro_batch_size=2, global_batch_size=2, seq_len=32, progress_bar=False,
                     tensorboard=False, checkpoint_every=1, keep_checkpoints=1)
    r = train(cfg, tc, ParallelConfig(), PretrainObjective(shards, seq_len=32, vocab_size=256), run_root,
              resume=False)
    return {"steps": len(r.losses),
            "committed": [m.metadata["step"] for m in CheckpointManager(f"{run_root}/checkpoints").committed()]}


def test_a_failed_cleanup_of_old_checkpoints_does_not_stop_training(tokens: str, tmp_path: Path) -> None:
    # before: the retention error was raised as "checkpoint commit ... failed" on every rank, after the
    # new checkpoint had been committed
    out = spawn(retention_fails, 1, [str(Path(tokens) / "train/part-00000.tok")], str(tmp_path / "run"))[0]
    assert out == {"steps": 3, "committed": [1, 2, 3]}
