"""Safe loading and the checkpoint bookkeeping that needs no distributed engine (unit tier, seconds).

    .venv/bin/python -m pytest tests/training/test_checkpoint_safety.py -q
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kubellm.core.errors import IntegrityError
from kubellm.core.manifest import MANIFEST_NAME, FileEntry, Manifest, commit_manifest
from kubellm.core.storage import join
from kubellm.training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointMismatchError,
    tag_for,
)
from kubellm.training.checkpoint_engine import (
    SafeTorchCheckpointEngine,
    UnsafeCheckpointError,
    install_safe_checkpoint_engine,
)


class _Exploit:
    """Unpickling this calls exec(): what a crafted checkpoint would do with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_crafted_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "step-00000001" / "mp_rank_00_model_states.pt"
    path.parent.mkdir()
    torch.save({"module": {"w": torch.ones(2)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        SafeTorchCheckpointEngine().load(str(path), map_location="cpu")
    msg = str(err.value)
    assert str(path) in msg and "exec" in msg and "allow-list" in msg
    assert not marker.exists()


class _System:
    def __reduce__(self):  # noqa: ANN204
        import os

        return (os.system, ("true",))


def test_a_global_from_a_blocked_module_is_named_too(tmp_path: Path) -> None:
    # torch words a blocked module (os/posix) differently ("Trying to load unsupported GLOBAL posix.system
    # whose module posix is blocked."): the message had quoted torch's documentation link instead
    path = tmp_path / "evil.pt"
    torch.save({"payload": _System()}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        SafeTorchCheckpointEngine().load(str(path), map_location="cpu")
    msg = str(err.value)
    assert str(path) in msg and "GLOBAL posix.system" in msg and "documentation" not in msg


def test_deepspeed_types_load_through_the_allow_list(tmp_path: Path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                      "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
                                      "fp32": torch.arange(4.0)}}
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save(state, path)
    with pytest.raises(Exception, match="Unsupported global"):  # plain weights_only refuses them
        torch.load(path, weights_only=True)
    engine = SafeTorchCheckpointEngine()
    got = engine.load(str(path), map_location="cpu")["optimizer_state_dict"]
    assert isinstance(got["loss_scaler"], LossScaler) and got["loss_scaler"].cur_scale == 1.0
    assert got["zero_stage"] is ZeroStageEnum.gradients
    assert got["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=0)
    assert torch.equal(got["fp32"], torch.arange(4.0))
    assert engine.loaded == [str(path)]


def test_not_a_checkpoint_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mp_rank_00_model_states.pt"
    path.write_bytes(b"definitely not a zip or pickle")
    with pytest.raises(IntegrityError, match=str(path)):
        SafeTorchCheckpointEngine().load(str(path))


def test_install_replaces_torch_engine_keeps_serialization() -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    original = TorchCheckpointEngine()
    original.zipfile_serialization = True
    engine = SimpleNamespace(checkpoint_engine=original)
    safe = install_safe_checkpoint_engine(engine)
    assert engine.checkpoint_engine is safe and safe.zipfile_serialization is True
    assert install_safe_checkpoint_engine(engine) is safe
    with pytest.raises(TypeError, match="TorchCheckpointEngine"):
        install_safe_checkpoint_engine(SimpleNamespace(checkpoint_engine=object()))


# ------------------------------------------------------------------ bookkeeping without an engine


def _commit(prefix: str, step: int, files: dict[str, bytes] | None = None) -> Manifest:
    files = files or {"mp_rank_00_model_states.pt": f"weights {step}".encode()}
    root = Path(prefix) / tag_for(step)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    import hashlib

    for name, data in files.items():
        (root / name).write_bytes(data)
        entries.append(FileEntry(path=name, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    m = Manifest(kind="checkpoint", uri=str(root), files=entries, metadata={"step": step, "tag": tag_for(step)})
    return commit_manifest(m)


def test_latest_ignores_torn_and_retention_deletes_only_older(tmp_path: Path) -> None:
    prefix = str(tmp_path / "run")
    mgr = CheckpointManager(prefix, keep=2, local_dir=tmp_path / "staging")
    assert mgr.latest() is None
    for s in (1, 3, 4, 5):
        _commit(prefix, s)
    torn_old = Path(prefix) / tag_for(2)
    torn_new = Path(prefix) / tag_for(9)  # e.g. a crash mid-upload after the last commit
    for d in (torn_old, torn_new):
        d.mkdir()
        (d / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert mgr.latest().metadata["step"] == 5
    mgr._retain(mgr.latest())
    assert [m.metadata["step"] for m in mgr.committed()] == [4, 5]
    assert not (Path(prefix) / tag_for(1)).exists() and not torn_old.exists()
    assert torn_new.exists()  # newer than the newest commit: never touched by retention


def test_a_copied_run_dir_uses_its_own_checkpoints(tmp_path: Path) -> None:
    import shutil

    original = tmp_path / "run"
    for s in (1, 2, 3):
        _commit(str(original), s)  # each manifest records the original's absolute prefix as its uri
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    mgr = CheckpointManager(str(copy), keep=1, local_dir=tmp_path / "staging")
    assert [m.uri for m in mgr.committed()] == [join(str(copy), tag_for(s)) for s in (1, 2, 3)]
    mgr._retain(mgr.latest())  # retention deletes the copy's old checkpoints, not the original's
    assert [m.metadata["step"] for m in mgr.committed()] == [3]
    assert not (copy / tag_for(1)).exists() and not (copy / tag_for(2)).exists()
    assert all((original / tag_for(s) / MANIFEST_NAME).exists() for s in (1, 2, 3))
    assert [m.metadata["step"] for m in CheckpointManager(str(original)).committed()] == [1, 2, 3]


def test_an_old_unusable_or_vanishing_manifest_does_not_block_the_newest(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import kubellm.training.checkpoint as ckpt
    from kubellm.core.errors import ManifestMissingError

    prefix = str(tmp_path / "run")
    for s in (1, 2, 3):
        _commit(prefix, s)
    # step 1's manifest is unreadable: latest() reads only the newest (it had read every one and raised)
    (tmp_path / "run" / tag_for(1) / MANIFEST_NAME).write_text("{not json")
    mgr = CheckpointManager(prefix, keep=1, local_dir=tmp_path / "staging")
    assert mgr.latest().metadata["step"] == 3
    with pytest.raises(Exception, match="_manifest.json"):
        mgr.committed()  # asked for all of them, it still says which one is bad
    mgr._retain(mgr.latest())  # retention skips it as unusable (torn) instead of failing the save
    assert [m.metadata["step"] for m in mgr.committed()] == [3]
    # retention by the run's rank 0 deletes a manifest between another process's listing and reading
    for s in (4, 5):
        _commit(prefix, s)
    real = ckpt.read_manifest

    def racing(p: str) -> Manifest:
        if p.endswith(tag_for(5)):
            raise ManifestMissingError(f"{p}: gone")
        return real(p)

    monkeypatch.setattr(ckpt, "read_manifest", racing)
    assert mgr.latest().metadata["step"] == 4 and [m.metadata["step"] for m in mgr.committed()] == [3, 4]
    # a manifest unreachable for a moment (S3 503) is not unusable: retention fails (save() logs it and
    # keeps every checkpoint) instead of deleting a good checkpoint as torn
    from kubellm.core.errors import StorageError

    def flaky(p: str) -> Manifest:
        if p.endswith(tag_for(4)):
            raise StorageError(f"{p}/_manifest.json: 503 Slow Down")
        return real(p)

    monkeypatch.setattr(ckpt, "read_manifest", flaky)
    with pytest.raises(StorageError, match="503"):
        CheckpointManager(prefix, keep=1, local_dir=tmp_path / "staging")._retain(real(join(prefix, tag_for(5))))
    assert (tmp_path / "run" / tag_for(4) / MANIFEST_NAME).exists()


def test_save_refuses_to_overwrite_a_committed_step(tmp_path: Path) -> None:
    prefix = str(tmp_path / "run")
    committed = _commit(prefix, 7)
    before = Path(join(committed.uri, MANIFEST_NAME)).read_bytes()
    mgr = CheckpointManager(prefix, local_dir=tmp_path / "staging")
    with pytest.raises(CheckpointError, match=r"step-00000007: a checkpoint for step 7 is already committed"):
        mgr.save(None, 7, {})
    assert Path(join(committed.uri, MANIFEST_NAME)).read_bytes() == before


def test_save_refuses_client_state_that_safe_loading_could_not_read(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path / "run"), local_dir=tmp_path / "staging")
    with pytest.raises(CheckpointError, match=r"client_state.*weights_only=True"):
        mgr.save(None, 1, {"loader": _Exploit(tmp_path / "m")})


def _fake_engine(dim: int = 8, stage: int = 1, dp: int = 1) -> SimpleNamespace:
    module = torch.nn.Linear(dim, 4)
    return SimpleNamespace(module=module, dp_world_size=dp, mp_world_size=1,
                           zero_optimization_stage=lambda: stage)


def _meta_manifest(tmp_path: Path, **metadata) -> Manifest:
    return Manifest(kind="checkpoint", uri=str(tmp_path / "run" / "step-00000003"), metadata=metadata)


def test_mismatch_names_differing_config_fields(tmp_path: Path) -> None:
    from kubellm.model.config import get_preset

    cfg = get_preset("debug")
    m = _meta_manifest(tmp_path, model_config=cfg.with_(n_layers=3, dim=128).model_dump(mode="json"),
                       layout={"world_size": 1, "dp": 1, "tp": 1, "pp": 1, "zero_stage": 1})
    mgr = CheckpointManager(str(tmp_path / "run"), model_config=cfg, local_dir=tmp_path / "s")
    with pytest.raises(CheckpointMismatchError) as err:
        mgr.check_compatible(m, _fake_engine())
    msg = str(err.value)
    assert "dim: checkpoint=128, this run=64" in msg and "n_layers: checkpoint=3, this run=2" in msg
    assert "_manifest.json" in msg and "ffn_dim" not in msg


def test_mismatch_without_config_compares_parameter_shapes(tmp_path: Path) -> None:
    m = _meta_manifest(tmp_path, param_shapes={"weight": [4, 16], "bias": [4]},
                       layout={"world_size": 1, "dp": 1, "tp": 1, "pp": 1, "zero_stage": 1})
    mgr = CheckpointManager(str(tmp_path / "run"), local_dir=tmp_path / "s")
    with pytest.raises(CheckpointMismatchError, match=r"weight: checkpoint=\[4, 16\], this run=\[4, 8\]"):
        mgr.check_compatible(m, _fake_engine())


def test_layout_mismatch_names_the_resharding_routes(tmp_path: Path) -> None:
    m = _meta_manifest(tmp_path, param_shapes={"weight": [4, 8], "bias": [4]},
                       layout={"world_size": 1, "dp": 1, "tp": 1, "pp": 1, "zero_stage": 3})
    mgr = CheckpointManager(str(tmp_path / "run"), local_dir=tmp_path / "s")
    with pytest.raises(CheckpointMismatchError) as err:
        mgr.check_compatible(m, _fake_engine(stage=1))
    assert "zero_stage: checkpoint=3, this run=1" in str(err.value)
    assert "ds_to_universal" in str(err.value) and "consolidated export" in str(err.value)
    # the universal route is named as one kubellm does not take (it was offered as a config key kubellm
    # cannot pass, whose loader unpickles with weights_only=False)
    assert "is not taken" in str(err.value) and "load_universal" not in str(err.value)


def test_files_for_rank_skips_other_ranks_shards(tmp_path: Path) -> None:
    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_01_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_model_states.pt", "kubellm_state_rank00000.pt",
             "kubellm_state_rank00001.pt"]
    m = Manifest(kind="checkpoint", uri="x", files=[FileEntry(path=n, size=1, sha256="0") for n in names])
    assert CheckpointManager.files_for_rank(m, dp_rank=1, rank=1) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_01_optim_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "kubellm_state_rank00001.pt"]
    assert len(CheckpointManager.files_for_rank(m, dp_rank=0, rank=0, elastic=True)) == 6
    with pytest.raises(IntegrityError, match="kubellm_state_rank00002.pt"):
        CheckpointManager.files_for_rank(m, dp_rank=2, rank=2)


def test_manifest_is_plain_json_with_the_step(tmp_path: Path) -> None:
    m = _commit(str(tmp_path / "run"), 12)
    data = json.loads(Path(m.uri, MANIFEST_NAME).read_text())
    assert data["kind"] == "checkpoint" and data["metadata"]["step"] == 12


def test_load_with_nothing_committed_returns_none(tmp_path: Path) -> None:
    prefix = tmp_path / "run"
    (prefix / tag_for(3)).mkdir(parents=True)
    (prefix / tag_for(3) / "mp_rank_00_model_states.pt").write_bytes(b"torn: no manifest")
    mgr = CheckpointManager(str(prefix), local_dir=tmp_path / "staging")
    assert mgr.latest() is None
    assert mgr.load(None) is None  # the engine is never touched


def test_step_tags_sort_and_refuse_negative() -> None:
    assert tag_for(7) == "step-00000007" and tag_for(123456789) == "step-123456789"
    with pytest.raises(CheckpointError, match="step must be >= 0"):
        tag_for(-1)


def _save_with_a_full_staging_disk_on_rank_1(root: str, staging: str) -> str:
    import torch.distributed as dist

    import kubellm.training.checkpoint as ck

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    class Engine:  # what save() needs of DeepSpeed's engine before its upload
        checkpoint_engine = None

        def save_checkpoint(self, d: str, tag: str, client_state: dict, save_latest: bool) -> None:
            (Path(d) / tag).mkdir(parents=True, exist_ok=True)
            (Path(d) / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x")

    if rank == 1:
        real = ck.torch.save

        def full(obj: object, f: object, *a: object, **k: object) -> None:
            if "kubellm_state_rank" in str(f):  # the state file; a buffer (the round-trip check) still works
                raise OSError(28, "No space left on device")
            real(obj, f, *a, **k)

        ck.torch.save = full  # this rank's own process only
    try:
        CheckpointManager(root, local_dir=Path(staging) / f"r{rank}").save(Engine(), 1, {})
    except Exception as e:  # noqa: BLE001 - what each rank raised is the result
        return f"{type(e).__name__}: {e}"
    return "saved"


def test_one_rank_failing_to_write_its_state_file_fails_every_rank(tmp_path: Path) -> None:
    """The state file is written after DeepSpeed's save: a rank that failed there had left save() alone
    while its peers went on to the upload's gather, where they met a broken or missing peer."""
    from kubellm.training.spawn import spawn

    got = spawn(_save_with_a_full_staging_disk_on_rank_1, 2, str(tmp_path / "run"), str(tmp_path / "staging"),
                timeout=120)
    assert got[1] == "OSError: [Errno 28] No space left on device"
    assert got[0].startswith("CheckpointError: checkpoint save ") and \
        "failed on 1 rank(s): rank 1: OSError: [Errno 28] No space left on device" in got[0]
    assert not any((tmp_path / "run").rglob("_manifest.json"))  # nothing committed
    # and neither rank keeps its node-local staging copy of the failed save (checkpoint-sized on a real run)
    assert [p for p in (tmp_path / "staging").rglob("*") if p.is_file()] == []


def test_a_relayout_names_a_state_file_without_client_state(tmp_path: Path) -> None:
    import io

    from kubellm.core.errors import IntegrityError
    from kubellm.model.config import get_preset
    from kubellm.training.relayout import read_consolidated

    def saved(obj: object) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    m = _commit(str(tmp_path / "run"), 4, {"mp_rank_00_model_states.pt": saved({"module": {}}),
                                           "kubellm_state_rank00000.pt": saved({"step": 4, "rng": {}})})
    with pytest.raises(IntegrityError, match=r"step-00000004/kubellm_state_rank00000\.pt: no client_state in it"):
        read_consolidated(m, get_preset("debug"), tmp_path / "staging")


@pytest.mark.parametrize("files_dir,paths", [
    ("../elsewhere", ["../elsewhere/mp_rank_00_model_states.pt"]),
    ("attempt-0a1b", ["mp_rank_00_model_states.pt"]),  # a file outside the directory named
    ("attempt-0a1b/..", ["attempt-0a1b/../mp_rank_00_model_states.pt"]),
])
def test_a_manifest_whose_files_dir_is_not_its_attempt_directory_is_refused(tmp_path: Path, files_dir: str,
                                                                            paths: list[str]) -> None:
    """`files_dir` becomes DeepSpeed's tag, a path it reads: it must be the one directory the
    sha256-verified files are in."""
    files = [FileEntry(path=p, size=1, sha256="0" * 64) for p in paths if ".." not in p]
    m = Manifest(kind="checkpoint", uri=str(tmp_path / "run" / "step-00000003"), files=files,
                 metadata={"step": 3, "files_dir": files_dir})
    with pytest.raises(IntegrityError, match=rf"files_dir {files_dir!r} is not the 'attempt-<hex id>' directory"):
        CheckpointManager._check_files_dir(m)
    ok = Manifest(kind="checkpoint", uri=str(tmp_path / "run" / "step-00000003"), metadata={"step": 3},
                  files=[FileEntry(path="attempt-0a1b/mp_rank_00_model_states.pt", size=1, sha256="0" * 64)])
    assert CheckpointManager._check_files_dir(ok.model_copy(update={"metadata": {"files_dir": "attempt-0a1b"}})) \
        == "attempt-0a1b"
    assert CheckpointManager._check_files_dir(ok) == ""  # the older layout names none
