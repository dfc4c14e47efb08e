"""Which run dir and cluster job a training stage uses: KFP retries re-attach and resume, and an
explicit `resume` input must name a run dir with a committed checkpoint (unit tier, no training).

    .venv/bin/python -m pytest tests/training/test_run_identity.py -q

The cluster launcher (`kubellm.training.pytorchjob.run_appdef`) is replaced by a recorder that fails
like an evicted job, so each test sees what every attempt of a stage would create or attach to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kubellm.core.errors import InputDataError, KubellmError
from kubellm.core.manifest import Manifest, commit_manifest, publish_dir
from kubellm.model import get_preset
from kubellm.training.checkpoint import tag_for
from kubellm.training.job import TrainingFailedError

KFP_ID = "5f0c2a9e-1111-2222-3333-444455556666"


@pytest.fixture
def tokens(tmp_path: Path) -> str:
    from kubellm.tokenizer.shards import TokenShardWriter

    src = tmp_path / "tok_src"
    with TokenShardWriter(src / "train/part-00000.tok", 256) as w:
        for i in range(20):
            w.add_document([1, *((np.arange(30) * 3 + i) % 250 + 3), 2])
    return publish_dir(src, str(tmp_path / "store/tokenizer/abc"), kind="token_shards",
                       metadata={"vocab_size": 256, "bos_id": 1, "eos_id": 2, "pad_id": 0}).uri


@pytest.fixture
def attempts(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    """Every cluster launch: its run id, derived job name and the run dir of its job.json."""
    import kubellm.training.pytorchjob as pj
    from kubellm.training.pytorchjob.translate import job_name

    seen: list[dict[str, str]] = []

    def fake_run_appdef(appdef: Any, *, run_id: str, task_name: str, **_: Any) -> None:
        args = " ".join(appdef.roles[0].args)
        spec_uri = args.split("--spec ", 1)[1].split()[0]
        seen.append({"run_id": run_id, "job": job_name(run_id, task_name),
                     "run_dir": spec_uri.rsplit("/", 1)[0]})
        raise KubellmError("simulated pod eviction")

    monkeypatch.setattr(pj, "run_appdef", fake_run_appdef)
    for k in ("KUBELLM_RUN_ID", "KUBELLM_KFP_RUN_ID", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    return seen


def _pretrain_cfg():  # noqa: ANN202
    from kubellm.core.config import validate
    from kubellm.pretrain.config import PretrainConfig

    return validate(PretrainConfig, {
        "model": {"preset": "debug", "overrides": {"vocab_size": 256, "max_seq_len": 64}},
        "train": {"max_steps": 2, "micro_batch_size": 2, "global_batch_size": 2, "seq_len": 32},
        "launch": {"backend": "pytorchjob", "cluster": {"s3_secret_name": "s3"}}})


def _sft_cfg():  # noqa: ANN202
    from kubellm.core.config import validate
    from kubellm.sft.config import SFTConfig

    return validate(SFTConfig, {"train": {"micro_batch_size": 2, "global_batch_size": 2},
                                "launch": {"backend": "pytorchjob", "cluster": {"s3_secret_name": "s3"}}})


def _attempt_pretrain(tokens: str, output: Path, **inputs: str) -> None:
    from kubellm.pretrain.stage import run

    with pytest.raises(TrainingFailedError, match="simulated pod eviction"):
        run(_pretrain_cfg(), {"tokens": tokens, **inputs}, str(output))


def _base_model(root: Path) -> str:
    """A local HF model directory (config.json is all the launcher reads of it)."""
    import json

    from kubellm.model.hf import hf_config_dict

    d = root / "base_model"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_config_dict(get_preset("debug"))))
    return str(d)


def _attempt_sft(output: Path, **inputs: str) -> None:
    from kubellm.training.model_stage import launch_or_run

    with pytest.raises(TrainingFailedError, match="simulated pod eviction"):
        launch_or_run("sft", _sft_cfg(), {"model": _base_model(output), "chat": "c", **inputs}, str(output),
                      str(output / "sft" / "prefix"), run_worker=None,
                      model_cfg=get_preset("debug"), parents={"model": "m", "chat": "c"})


def test_kfp_retry_reuses_the_run_dir_and_the_job(tokens: str, tmp_path: Path, attempts: list,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBELLM_KFP_RUN_ID", KFP_ID)  # what pipelines/definitions.py injects
    _attempt_pretrain(tokens, tmp_path)
    _attempt_pretrain(tokens, tmp_path)  # the KFP retry of the same task
    _attempt_sft(tmp_path)
    _attempt_sft(tmp_path)
    first, retry, sft, sft_retry = attempts
    assert first == retry and sft == sft_retry
    assert first["run_dir"] == str(tmp_path / "runs" / f"pretrain-kfp-{KFP_ID}")
    assert sft["run_dir"] == str(tmp_path / "runs" / f"sft-kfp-{KFP_ID}")
    assert first["job"] != sft["job"]  # two stages of one KFP run never share a job
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [f"pretrain-kfp-{KFP_ID}", f"sft-kfp-{KFP_ID}"]

    monkeypatch.setenv("KUBELLM_KFP_RUN_ID", "another-kfp-run")  # a new pipeline run trains afresh
    _attempt_pretrain(tokens, tmp_path)
    assert attempts[-1]["run_dir"] != first["run_dir"] and attempts[-1]["job"] != first["job"]

    monkeypatch.setenv("KUBELLM_RUN_ID", "chosen")  # an explicit run id wins
    _attempt_pretrain(tokens, tmp_path)
    assert attempts[-1]["run_dir"] == str(tmp_path / "runs" / "pretrain-chosen")  # scoped by stage


def test_without_a_run_id_the_same_training_resumes_its_run(tokens: str, tmp_path: Path, attempts: list) -> None:
    """Outside KFP (`kubellm run --local`, a stage command) the run dir follows the content prefix the run
    publishes to: running the same training again after a crash or Ctrl-C finds its checkpoints (it had
    started from step 0 in a new timestamped dir, leaving the old one behind); other config trains afresh."""
    from kubellm.core.manifest import read_manifest
    from kubellm.pretrain.stage import _hash
    from kubellm.training.job import new_run_id

    _attempt_pretrain(tokens, tmp_path)
    _attempt_pretrain(tokens, tmp_path)
    first, again = attempts
    prefix_hash = _content_hash(tmp_path, _hash(_pretrain_cfg()), read_manifest(tokens).digest())
    assert first["run_dir"] == again["run_dir"] == str(tmp_path / "runs" / f"pretrain-{prefix_hash}-w1")
    assert first["job"] == again["job"]
    other = _pretrain_cfg().model_copy(update={"train": _pretrain_cfg().train.model_copy(update={"max_steps": 3})})
    from kubellm.pretrain.stage import run

    with pytest.raises(TrainingFailedError, match="simulated pod eviction"):
        run(other, {"tokens": tokens}, str(tmp_path))
    assert attempts[-1]["run_dir"] != first["run_dir"]
    # launch stays out of the content hash, but a checkpoint resumes only with its data-parallel degree:
    # another process count is another run dir (it had been a run dir whose resume was refused for good)
    narrow = _pretrain_cfg()
    narrow = narrow.model_copy(update={"train": narrow.train.model_copy(update={"global_batch_size": 4})})
    wider = narrow.model_copy(update={"launch": narrow.launch.model_copy(update={"nproc_per_node": 2})})
    for cfg in (narrow, wider):
        with pytest.raises(TrainingFailedError, match="simulated pod eviction"):
            run(cfg, {"tokens": tokens}, str(tmp_path))
    one, two = attempts[-2]["run_dir"], attempts[-1]["run_dir"]
    assert one.endswith("-w1") and two == one.removesuffix("-w1") + "-w2"
    assert new_run_id("sft").startswith("sft-") and new_run_id("sft") != new_run_id("sft")  # nothing to key on


def _content_hash(root: Path, config_hash: str, tokens_digest: str) -> str:
    from kubellm.core.manifest import content_prefix

    return content_prefix(str(root), "pretrain", config_hash, {"tokens": tokens_digest}).rstrip("/").rsplit("/", 1)[-1]


def _committed_checkpoint(run_dir: Path, step: int) -> None:
    prefix = run_dir / "checkpoints" / tag_for(step)
    prefix.mkdir(parents=True)
    commit_manifest(Manifest(kind="checkpoint", uri=str(prefix), metadata={"step": step, "tag": tag_for(step)}))


def test_resume_of_a_run_dir_without_a_checkpoint_is_refused(tokens: str, tmp_path: Path, attempts: list) -> None:
    from kubellm.pretrain.stage import run
    from kubellm.training.model_stage import launch_or_run

    missing = tmp_path / "runs" / "typo"
    with pytest.raises(InputDataError, match=r"resume=.*typo: no committed checkpoint under .*typo/checkpoints"):
        run(_pretrain_cfg(), {"tokens": tokens, "resume": str(missing)}, str(tmp_path))
    with pytest.raises(InputDataError, match="no committed checkpoint"):
        launch_or_run("sft", _sft_cfg(), {"model": _base_model(tmp_path), "chat": "c", "resume": str(missing)},
                      str(tmp_path), str(tmp_path / "sft" / "prefix"), run_worker=None,
                      model_cfg=get_preset("debug"), parents={"model": "m", "chat": "c"})
    assert not missing.exists() and attempts == []  # nothing created, nothing launched

    torn = tmp_path / "runs" / "torn"
    (torn / "checkpoints" / tag_for(2)).mkdir(parents=True)  # a crash mid-upload: never committed
    with pytest.raises(InputDataError, match="no committed checkpoint"):
        run(_pretrain_cfg(), {"tokens": tokens, "resume": str(torn)}, str(tmp_path))

    good = tmp_path / "runs" / "earlier"
    _committed_checkpoint(good, 2)
    _attempt_pretrain(tokens, tmp_path, resume=str(good))
    _attempt_sft(tmp_path, resume=str(good))
    assert [a["run_dir"] for a in attempts] == [str(good), str(good)]
