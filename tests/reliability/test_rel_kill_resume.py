"""Kill and resume: a 2-process pretrain job (the stage → TorchX AppDef → torchrun → workers) loses a
rank mid-run, or the whole job dies, and the resumed run matches an uninterrupted one exactly.

    .venv/bin/python -m pytest tests/reliability/test_rel_kill_resume.py -q

The fault is `KUBELLM_FAULT_KILL_AT_STEP` (kubellm.core.faults): the named rank calls
`os._exit(137)` before optimizer step 6, on the first attempt only. Checkpoints commit at steps 2, 4,
6, 8, so the last committed one before the kill is step 4.
* one rank dies: torchrun (`launch.max_restarts=1`) restarts the worker group, which resumes from
  step 4; steps 5–8 have the uninterrupted run's losses bit for bit, and step 5 (trained before the
  kill and again after the restart) shows up once in metrics.jsonl: the resumed run replaces the
  rows after its checkpoint.
* the whole job dies (`max_restarts=0`): the stage fails with the exit code; re-running the stage
  with the same run id (what a KFP retry does) resumes from step 4 and publishes a model whose
  exported weights are byte-identical to the uninterrupted run's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from relkit import make_shards, publish_tokens, read_metrics

from kubellm.core.manifest import read_manifest

STEPS = 8


def _config(**launch: object):  # noqa: ANN202
    from kubellm.pretrain.config import PretrainConfig

    return PretrainConfig.model_validate({
        "model": {"preset": "debug", "overrides": {"vocab_size": 256, "max_seq_len": 64}},
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "global_batch_size": 8, "seq_len": 32,
                  "checkpoint_every": 2, "keep_checkpoints": 2, "progress_bar": False, "tensorboard": False,
                  "device": "cpu", "optim": {"lr": 3e-3, "warmup_steps": 2}},
        "launch": {"nproc_per_node": 2, "env": {"OMP_NUM_THREADS": "1"}, **launch},
    })


@pytest.fixture(scope="module", autouse=True)
def _not_a_worker() -> Iterator[None]:
    """The stage launches torchrun only when this process is not itself a distributed worker."""
    with pytest.MonkeyPatch.context() as mp:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(k, raising=False)
        yield


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("kill-tokens")
    make_shards(root / "shards")
    return publish_tokens(root / "shards", str(root / "store"))


@pytest.fixture(scope="module")
def reference(tokens: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, dict], object]:
    from kubellm.stages import run_stage

    out = tmp_path_factory.mktemp("kill-ref")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBELLM_RUN_ID", "reference")
        manifest = run_stage("pretrain", _config(), {"tokens": tokens}, str(out))
    return read_metrics(out / "runs" / "pretrain-reference" / "metrics.jsonl"), manifest


def _weights_sha(manifest: object) -> str:
    return next(f.sha256 for f in manifest.files if f.path.endswith(".safetensors"))  # type: ignore[attr-defined]


@pytest.mark.integration
def test_rank_killed_mid_run_restarts_and_resumes_exactly(tokens: str, reference: tuple, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from kubellm.stages import run_stage

    ref_rows, ref_manifest = reference
    monkeypatch.setenv("KUBELLM_RUN_ID", "killed-rank")
    cfg = _config(max_restarts=1, env={"OMP_NUM_THREADS": "1", "KUBELLM_FAULT_KILL_AT_STEP": "6:1"})
    manifest = run_stage("pretrain", cfg, {"tokens": tokens}, str(tmp_path))
    run_dir = tmp_path / "runs" / "pretrain-killed-rank"  # <stage>-$KUBELLM_RUN_ID
    text = (run_dir / "metrics.jsonl").read_text()
    steps = [json.loads(line)["step"] for line in text.splitlines()]
    assert steps == list(range(1, STEPS + 1))  # step 5, re-trained after the restart, logged once
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [rows[s]["loss"] for s in range(5, STEPS + 1)] == [ref_rows[s]["loss"] for s in range(5, STEPS + 1)]
    assert _weights_sha(manifest) == _weights_sha(ref_manifest)


@pytest.mark.integration
@pytest.mark.parametrize("run_id", ["killed-job", None])
def test_whole_job_killed_then_rerun_resumes_from_the_same_run_dir(tokens: str, reference: tuple,
                                                                    tmp_path: Path, run_id: str | None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With a run id (a KFP retry), and without one: a local re-run of the same training (`kubellm run
    --local`, a stage command) finds its run dir by the content prefix it publishes to."""
    from kubellm.stages import run_stage
    from kubellm.training.checkpoint import CheckpointManager
    from kubellm.training.job import TrainingFailedError

    ref_rows, ref_manifest = reference
    monkeypatch.delenv("KUBELLM_KFP_RUN_ID", raising=False)
    if run_id:
        monkeypatch.setenv("KUBELLM_RUN_ID", run_id)
    else:
        monkeypatch.delenv("KUBELLM_RUN_ID", raising=False)
    killed = _config(env={"OMP_NUM_THREADS": "1", "KUBELLM_FAULT_KILL_AT_STEP": "6:*"})
    with pytest.raises(TrainingFailedError, match="exit code"):
        run_stage("pretrain", killed, {"tokens": tokens}, str(tmp_path))
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name == (f"pretrain-{run_id}" if run_id else f"pretrain-{_prefix_hash(tokens)}-w2")
    latest = CheckpointManager(str(run_dir / "checkpoints")).latest()
    assert latest is not None and latest.metadata["step"] == 4
    manifest = run_stage("pretrain", _config(), {"tokens": tokens}, str(tmp_path))  # the retry
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [rows[s]["loss"] for s in range(1, STEPS + 1)] == [ref_rows[s]["loss"] for s in range(1, STEPS + 1)]
    assert _weights_sha(manifest) == _weights_sha(ref_manifest)
    assert read_manifest(manifest.uri).digest() == manifest.digest()
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]  # no second, fresh run dir


def _prefix_hash(tokens: str) -> str:
    from kubellm.core.manifest import content_prefix
    from kubellm.pretrain.stage import _hash

    prefix = content_prefix("x", "pretrain", _hash(_config()), {"tokens": read_manifest(tokens).digest()})
    return prefix.rstrip("/").rsplit("/", 1)[-1]
