"""Sharded DeepSpeed checkpoints, committed atomically to a run prefix (S3 or local), resumed exactly.

    from kubellm.training.checkpoint import CheckpointManager
    ckpt = CheckpointManager("s3://bucket/runs/run-42/checkpoints", keep=2, model_config=model_cfg)
    client_state = ckpt.load(engine)                # None when the run has no committed checkpoint
    if client_state is not None:
        loader.load_state_dict(client_state["loader"]); start = client_state["step"]
    ...
    ckpt.save(engine, step, {"loader": loader.state_dict(), "step": step})   # every rank calls it
    full = ckpt.consolidated_state_dict(engine)     # rank 0: fp32 CPU state_dict, any ZeRO stage

What each manifest records of the engine (layout, model config, parameter shapes, precision) is
`kubellm.training.engine_meta`; gathering the whole model's weights, `kubellm.training.consolidate`.

Layout of a run prefix (one per training run; two runs never share one):

    <run_prefix>/step-00000010/attempt-<id>/mp_rank_00_model_states.pt    DeepSpeed's files, as written
    <run_prefix>/step-00000010/attempt-<id>/zero_pp_rank_{r}_mp_rank_00_optim_states.pt
    <run_prefix>/step-00000010/attempt-<id>/kubellm_state_rank{r:05d}.pt   per-rank RNG + client_state
    <run_prefix>/step-00000010/_manifest.json                             committed last, by rank 0

Each save writes its files under a directory of its own (`attempt-<id>`, drawn by rank 0 per save and
recorded in the manifest as `files_dir`), so no writer ever puts over a file a committed manifest
lists: a pod of an earlier attempt of the job that is still running (a "zombie" on a partitioned
node, while the PyTorchJob's restarted pods train on) uploads into its own directory, and its commit
then loses to the committed manifest (refused, never overwriting it). Its stray files go with the
checkpoint when retention removes it. Manifests written before this layout (files at the step
prefix, no `files_dir`) still load.

Save protocol (why each step): DeepSpeed assumes one shared filesystem, so each rank writes into
its own node-local staging directory (`save_latest=False`: no `latest` file, the manifest is the
pointer), uploads only the files it wrote, then all ranks all-gather (path, size, sha256) and
barrier; rank 0 commits the manifest with a conditional put. A prefix without `_manifest.json` —
a crash mid-upload — does not exist for `latest()`/`load()`. Retention deletes the oldest committed
checkpoints (manifest first, then files) only after the new one is committed.

Load protocol: rank 0 picks the newest committed manifest and broadcasts it (its files are read from
where the manifest was found, not from the uri it records, so a copied run dir is self-contained); each rank checks the
model shape and parallel layout against it, downloads the files it needs, verifies every sha256
BEFORE anything is unpickled, then `engine.load_checkpoint` runs through
`SafeTorchCheckpointEngine` (`weights_only=True`, explicit allow-list). Failures on any rank are
gathered and raised on every rank (no rank is left hanging in a collective).

Resharding to another data-parallel degree or ZeRO stage is refused, naming what must match (another
tp/pp alone resumes through `kubellm.training.relayout`). DeepSpeed's universal checkpoint
(`ds_to_universal`) is not a route kubellm takes: DeepSpeed loads it with plain pickle.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubellm.core.errors import IntegrityError, KubellmError, ManifestMissingError
from kubellm.core.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    commit_manifest,
    fetch,
    read_manifest,
    stable_hash,
)
from kubellm.core.storage import is_s3, join, local_path, sha256_file, storage_for
from kubellm.training.checkpoint_engine import (
    SafeTorchCheckpointEngine,
    install_safe_checkpoint_engine,
    safe_torch_load,
)
from kubellm.training.collective import all_gather_objects, raise_if_any_failed
from kubellm.training.consolidate import consolidated_state_dict
from kubellm.training.engine_meta import (
    config_dict,
    engine_layout,
    model_config_diff,
    module_config,
    param_shapes,
    precision_name,
    zero_partition_rank,
)

KIND = "checkpoint"
TAG_RE = re.compile(r"^step-(\d{8,})$")
STATE_FILE = "kubellm_state_rank{rank:05d}.pt"
_ZERO_SHARD_RE = re.compile(r"(?:^|/)(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(?:model|optim)_states\.pt$")
_STATE_FILE_RE = re.compile(r"(?:^|/)kubellm_state_rank(\d+)\.pt$")
_FILES_DIR_RE = re.compile(r"attempt-[0-9a-f]{1,64}")
RESHARD_ROUTES = (
    "kubellm resumes a checkpoint with the data-parallel degree and ZeRO stage it was written with (a "
    "change of parallel.tp or parallel.pp alone resumes from its consolidated weights): run with those, or "
    "start a new run. DeepSpeed's own resharding route, a universal checkpoint (`ds_to_universal`), is not "
    "taken: DeepSpeed loads those with plain pickle (weights_only=False), which kubellm never does; "
    "kubellm's consolidated export (`CheckpointManager.consolidated_state_dict`, the HF export) carries "
    "the weights without the optimizer state."
)

log = logging.getLogger(__name__)


class CheckpointError(KubellmError):
    """A checkpoint cannot be saved or loaded; the message names the checkpoint and the reason."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written by another model shape or parallel layout than this run's."""


_ERROR_TYPES: dict[str, type[KubellmError]] = {
    c.__name__: c for c in (IntegrityError, ManifestMissingError, CheckpointError, CheckpointMismatchError)
}


def _drop_empty_dirs(prefix: str) -> None:
    """Locally, the directories deleting a prefix's files left empty (S3 has no directories)."""
    if not is_s3(prefix):
        for d in sorted(local_path(prefix).glob("**/"), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()


def tag_for(step: int) -> str:
    """The checkpoint tag (= sub-prefix) of a step: `step-00000010`."""
    if step < 0:
        raise CheckpointError(f"checkpoint step must be >= 0, got {step}")
    return f"step-{step:08d}"


# ---------------------------------------------------------------- distributed helpers


def _dist() -> Any | None:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def _broadcast(obj: Any) -> Any:
    d = _dist()
    if d is None:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


def _raise_if_any_failed(error: BaseException | None, what: str) -> None:
    """Collective: every rank raises, as the same kind of checkpoint error, so no rank proceeds into a
    DeepSpeed collective that its peers will never join."""
    raise_if_any_failed(error, what, _ERROR_TYPES, CheckpointError)


# ---------------------------------------------------------------- per-rank training state


def _rng_state() -> dict[str, Any]:
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # numpy's MT19937 state: (name, uint32[624] key, pos, has_gauss, cached_gaussian); stored as
        # plain tensors/numbers so weights_only=True loads it without allow-listing numpy.
        "numpy": {"name": str(np_state[0]), "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_weights_only_roundtrip(obj: Any, what: str) -> None:
    """Refuse, at save time, a client_state that `weights_only=True` could not load back later."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{what} holds a type that safe loading (torch.load weights_only=True) refuses: {e}. "
            "Keep it to tensors, numbers, strings, bools, None, lists, tuples and dicts."
        ) from e


def _jsonable(obj: Any) -> Any | None:
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- the manager


class CheckpointManager:
    """Save / find / load committed DeepSpeed checkpoints under one run prefix.

    Args:
        run_prefix: run-scoped storage prefix (`s3://bucket/runs/<run>/checkpoints` or a local dir).
        keep: committed checkpoints to keep (older ones are deleted after a newer one commits).
        local_dir: node-local staging directory (default: $KUBELLM_CHECKPOINT_STAGING, the PyTorchJob's
            staging volume at $KUBELLM_STAGING_DIR, or the
            system temp dir). Each rank stages under `<local_dir>/<run hash>/rank{r:05d}`.
        model_config: the model's config (pydantic/dataclass/mapping), recorded in the manifest and
            compared on load; default: `engine.module.cfg` when the module has one.
    """

    def __init__(self, run_prefix: str, keep: int = 2, local_dir: Path | None = None, *,
                 model_config: Any = None) -> None:
        if keep < 1:
            raise CheckpointError(f"keep must be >= 1 (got {keep}): the newest checkpoint is always kept")
        self.run_prefix = run_prefix.rstrip("/") if run_prefix != "/" else run_prefix
        self.keep = keep
        # the PyTorchJob mounts a staging volume (`staging`) at KUBELLM_STAGING_DIR: checkpoints are
        # staged there, not on the node's root disk
        staging = os.environ.get("KUBELLM_STAGING_DIR")
        base = Path(local_dir or os.environ.get("KUBELLM_CHECKPOINT_STAGING")
                    or (Path(staging) / "kubellm-ckpt" if staging else Path(tempfile.gettempdir()) / "kubellm-ckpt"))
        self.local_dir = base / stable_hash(self.run_prefix)[:16]
        self.model_config = model_config
        self.storage = storage_for(self.run_prefix)

    # -- paths

    def prefix_for(self, step: int) -> str:
        return join(self.run_prefix, tag_for(step))

    def _staging(self, kind: str) -> Path:
        return self.local_dir / f"rank{_rank():05d}" / kind

    # -- listing

    def _committed_steps(self) -> list[int]:
        """Steps whose prefix holds a manifest, ascending."""
        steps = []
        for obj in self.storage.list(self.run_prefix):
            parts = obj.relpath.split("/")
            if len(parts) == 2 and parts[1] == MANIFEST_NAME and (m := TAG_RE.match(parts[0])):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def _read(self, step: int) -> Manifest | None:
        """The checkpoint manifest of `step`, or None when it vanished since the listing (retention by
        the run's rank 0 while another process — a re-attaching launcher — reads)."""
        prefix = self.prefix_for(step)
        try:
            manifest = read_manifest(prefix)
        except ManifestMissingError:
            return None
        except Exception:
            if not self.storage.exists(join(prefix, MANIFEST_NAME)):
                return None
            raise
        if manifest.kind != KIND:
            raise CheckpointError(f"{prefix}: manifest kind {manifest.kind!r}, expected {KIND!r}")
        # Where it was found, not the uri it records: a copied or moved run dir then loads (and
        # retention deletes) its own files, never the original run's.
        return manifest.model_copy(update={"uri": prefix})

    def committed(self, skip_unreadable: bool = False) -> list[Manifest]:
        """Every committed checkpoint under the run prefix, oldest first. A manifest that is not a valid
        checkpoint manifest (bad JSON or fields, another kind) raises, unless `skip_unreadable` (it is
        then logged and left out). A storage error always raises: a manifest merely unreachable for a
        moment must never look unusable to retention, which would delete a good checkpoint."""
        out = []
        for step in self._committed_steps():
            try:
                manifest = self._read(step)
            except (IntegrityError, CheckpointError) as e:
                if not skip_unreadable:
                    raise
                log.warning("%s: skipped, its manifest cannot be used: %s", self.prefix_for(step), e)
                continue
            if manifest is not None:
                out.append(manifest)
        return out

    def latest(self) -> Manifest | None:
        """The newest committed checkpoint, or None. Uncommitted (torn) prefixes are ignored, and only
        the newest manifest is read: an older unreadable one does not block a resume."""
        for step in reversed(self._committed_steps()):
            manifest = self._read(step)
            if manifest is not None:
                return manifest
        return None

    # -- save

    def save(self, engine: Any, step: int, client_state: dict[str, Any] | None = None) -> Manifest:
        """Collective: every rank calls it. Returns the committed manifest on every rank."""
        client_state = dict(client_state or {})
        prefix = self.prefix_for(step)
        staging = self._staging("save")
        rank = _rank()
        # this save's own directory under the step prefix (module docstring): one id for every rank
        files_dir = _broadcast(f"attempt-{uuid.uuid4().hex[:16]}" if rank == 0 else None)
        error: BaseException | None = None
        try:
            if self.storage.exists(join(prefix, MANIFEST_NAME)):
                raise CheckpointError(
                    f"{prefix}: a checkpoint for step {step} is already committed; refusing to "
                    "overwrite it (resume from it, or use a new run prefix)")
            _check_weights_only_roundtrip(client_state, f"client_state passed to save(step={step})")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)  # every rank: DeepSpeed only creates it on rank 0
        except BaseException as e:
            error = e
        _raise_if_any_failed(error, f"checkpoint save {prefix}")

        install_safe_checkpoint_engine(engine)
        # client_state also goes to DeepSpeed (into its model-states file) so DeepSpeed's own tools
        # see it; the authoritative copy is the per-rank state file, because DeepSpeed writes the
        # model-states file on DP rank 0 only (ZeRO 0-2) and would drop the other ranks' RNG/data.
        # DeepSpeed's save runs collectives of its own: it is not wrapped (a rank leaving it early would
        # meet its peers in the wrong collective); the steps after it are, so a full staging disk on one
        # rank fails every rank instead of leaving its peers waiting in the upload's gather
        engine.save_checkpoint(str(staging), tag=files_dir, client_state=client_state, save_latest=False)
        try:  # a failed save frees its node-local staging copy (checkpoint-sized) too, not at the next save
            tag_dir = staging / files_dir
            error = None
            try:
                torch.save({"step": step, "rank": rank, "rng": _rng_state(), "client_state": client_state},
                           tag_dir / STATE_FILE.format(rank=rank))
            except BaseException as e:
                error = e
            _raise_if_any_failed(error, f"checkpoint save {prefix}")

            entries: list[FileEntry] = []
            try:
                files = sorted(p for p in tag_dir.rglob("*") if p.is_file())

                def upload(p: Path) -> FileEntry:
                    rel = f"{files_dir}/{p.relative_to(tag_dir).as_posix()}"
                    entry = FileEntry(path=rel, size=p.stat().st_size, sha256=sha256_file(p))
                    self.storage.upload(p, join(prefix, rel))
                    return entry

                with ThreadPoolExecutor(max_workers=8) as pool:
                    entries = list(pool.map(upload, files))
                error = None
            except BaseException as e:
                error = e
            _raise_if_any_failed(error, f"checkpoint upload {prefix}")

            per_rank = all_gather_objects([e.model_dump() for e in entries])
            states = all_gather_objects(_jsonable(client_state))
            manifest: Manifest | None = None
            error = None
            if rank == 0:
                try:
                    manifest = self._commit(engine, step, prefix, per_rank, states, files_dir)
                except BaseException as e:
                    error = e
                if manifest is not None:
                    try:  # the new checkpoint is committed: failing to delete old ones must not stop training
                        self._retain(manifest)
                    except Exception as e:
                        log.warning("checkpoint %s committed, but removing older checkpoints failed (they stay): %s",
                                    prefix, e)
            _raise_if_any_failed(error, f"checkpoint commit {prefix}")
            manifest = _broadcast(manifest)
        finally:  # committed or failed: the node-local copy is not needed any more
            shutil.rmtree(staging, ignore_errors=True)
        return manifest

    def _commit(self, engine: Any, step: int, prefix: str, per_rank: list[list[dict[str, Any]]],
                states: list[Any], files_dir: str) -> Manifest:
        seen: dict[str, tuple[int, FileEntry]] = {}
        for r, rank_files in enumerate(per_rank):
            for f in rank_files:
                entry = FileEntry.model_validate(f)
                if entry.path in seen and seen[entry.path][1].sha256 != entry.sha256:
                    raise CheckpointError(
                        f"{join(prefix, entry.path)}: written by rank {seen[entry.path][0]} and rank {r} "
                        "with different contents (two ranks must never write the same file)")
                seen.setdefault(entry.path, (r, entry))
        files = [e for _, e in sorted(seen.values(), key=lambda x: x[1].path)]
        cfg = self.model_config if self.model_config is not None else module_config(engine)
        import deepspeed

        metadata: dict[str, Any] = {
            "step": step,
            "tag": tag_for(step),
            "files_dir": files_dir,  # DeepSpeed's tag directory: every file's path starts with it
            "model_config": config_dict(cfg),
            "param_shapes": param_shapes(engine),
            "layout": engine_layout(engine).as_dict(),
            "precision": precision_name(engine),
            "deepspeed_version": deepspeed.__version__,
            "torch_version": torch.__version__,
            "global_steps": int(getattr(engine, "global_steps", step)),
            "global_samples": int(getattr(engine, "global_samples", 0)),
            # The data position (the caller's loader.state_dict()) of every rank, when JSON-able;
            # the authoritative copy is each rank's kubellm_state file.
            "client_state_by_rank": states if all(s is not None for s in states) else None,
        }
        manifest = Manifest(
            kind=KIND, uri=prefix, files=files,
            counts={"step": step, "files": len(files), "bytes": sum(f.size for f in files)},
            config_hash=stable_hash(metadata["model_config"]) if metadata["model_config"] else "",
            metadata=metadata,
        )
        return commit_manifest(manifest)

    def _retain(self, newest: Manifest) -> None:
        """Delete committed checkpoints beyond the newest `keep`, and torn (uncommitted) prefixes
        older than the newest commit. Each deletion removes the manifest first, so a checkpoint
        stops existing before its files start to disappear. In the checkpoints kept, files their
        manifest does not list (another attempt's: a save that failed after its upload, a zombie pod's)
        are deleted too."""
        newest_step = int(newest.metadata["step"])
        committed = self.committed(skip_unreadable=True)  # an unusable old one goes as torn, not fatal
        doomed = [m.uri for m in committed[:-self.keep]] if len(committed) > self.keep else []
        committed_uris = {m.uri for m in committed}
        objects = self.storage.list(self.run_prefix)
        torn = {join(self.run_prefix, o.relpath.split("/")[0]) for o in objects
                if (m := TAG_RE.match(o.relpath.split("/")[0])) and int(m.group(1)) < newest_step}
        doomed += sorted(torn - committed_uris)
        for prefix in doomed:
            self.storage.delete(join(prefix, MANIFEST_NAME))
            for obj in self.storage.list(prefix):
                self.storage.delete(obj.uri)
            _drop_empty_dirs(prefix)
        for kept in committed[-self.keep:]:
            tag = kept.uri.rstrip("/").rsplit("/", 1)[-1]
            listed = {f.path for f in kept.files} | {MANIFEST_NAME}
            strays = [o for o in objects if o.relpath.split("/")[0] == tag
                      and o.relpath.split("/", 1)[-1] not in listed]
            for obj in strays:
                self.storage.delete(obj.uri)
            if strays:
                _drop_empty_dirs(kept.uri)

    # -- load

    @staticmethod
    def _check_files_dir(manifest: Manifest) -> str:
        """The manifest's `files_dir` ("" in the older layout), refused unless it is one plain directory
        name that every file's path starts with: it becomes DeepSpeed's tag (a path it reads)."""
        files_dir = str(manifest.metadata.get("files_dir") or "")
        if files_dir and (not _FILES_DIR_RE.fullmatch(files_dir)
                          or any(not f.path.startswith(files_dir + "/") for f in manifest.files)):
            raise IntegrityError(f"{join(manifest.uri, MANIFEST_NAME)}: files_dir {files_dir!r} is not the "
                                 "'attempt-<hex id>' directory every listed file is in; the manifest was not "
                                 "written by kubellm's CheckpointManager")
        return files_dir

    def load(self, engine: Any, manifest: Manifest | None = None) -> dict[str, Any] | None:
        """Collective: restore the newest committed checkpoint (or `manifest`) into `engine`:
        model, optimizer, scheduler (DeepSpeed), this rank's RNG states, and return this rank's
        `client_state` (None when there is no committed checkpoint)."""
        error: BaseException | None = None
        chosen: Manifest | None = None
        if _rank() == 0:
            try:
                chosen = manifest if manifest is not None else self.latest()
            except BaseException as e:
                error = e
        _raise_if_any_failed(error, f"finding the latest checkpoint under {self.run_prefix}")
        chosen = _broadcast(chosen)
        if chosen is None:
            return None

        # DeepSpeed reads <staging>/<tag>/: the save's own directory (its files' paths start with it), or, in a
        # manifest of the older layout, the step's tag with the files at the step prefix
        files_dir = str(chosen.metadata.get("files_dir") or "")
        tag = files_dir or str(chosen.metadata.get("tag") or chosen.uri.rstrip("/").rsplit("/", 1)[-1])
        staging = self._staging("load")
        local = staging if files_dir else staging / tag  # where the manifest's paths land
        error = None
        try:
            self._check_files_dir(chosen)
            self.check_compatible(chosen, engine)
            wanted = self.files_for_rank(chosen, zero_partition_rank(engine), _rank(),
                                         elastic=bool(engine.zero_elastic_checkpoint()))
            shutil.rmtree(staging, ignore_errors=True)
            fetch(chosen, local, paths=wanted)  # downloads + sha256-verifies each file
            # every file this rank's DeepSpeed load will unpickle, checked against the allow-list first
            # (storages mapped, not read): DeepSpeed's ZeRO-3 load ends in a collective, so a refusal
            # inside it would leave this rank's peers waiting there, not in the exchange below
            for path in wanted:
                if path.endswith(".pt"):
                    safe_torch_load(local / path, map_location="cpu", mmap=True)
        except BaseException as e:
            error = e
            shutil.rmtree(staging, ignore_errors=True)  # never leave unverified or refused files behind
        _raise_if_any_failed(error, f"checkpoint load {chosen.uri}")

        safe = install_safe_checkpoint_engine(engine)
        error, state = None, {}
        try:  # every rank learns of one rank's failure here (the caller's next step is a collective):
            # a refused pickle in this rank's ZeRO shard as much as a missing state file
            load_path, _ = engine.load_checkpoint(str(staging), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if load_path is None:
                raise CheckpointError(f"{chosen.uri}: DeepSpeed found no model-states file in it")
            name = STATE_FILE.format(rank=_rank())
            state = safe_torch_load(staging / tag / name)
            missing = [k for k in ("rng", "client_state") if k not in state]
            if missing:
                raise IntegrityError(f"{chosen.uri}/{name}: no {' or '.join(missing)} in it; the state file was "
                                     "not written by kubellm's CheckpointManager")
        except BaseException as e:
            error = e
        try:
            _raise_if_any_failed(error, f"checkpoint load {chosen.uri}")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # on the ranks that succeeded too
            raise
        _set_rng_state(state["rng"])  # last: DeepSpeed's loading must not advance the restored RNG
        shutil.rmtree(staging, ignore_errors=True)
        self.last_loaded = chosen
        self._safe_engine: SafeTorchCheckpointEngine = safe
        return dict(state["client_state"])

    @staticmethod
    def files_for_rank(manifest: Manifest, dp_rank: int, rank: int, elastic: bool = False) -> list[str]:
        """The files this rank's `engine.load_checkpoint` reads: everything except other ranks'
        ZeRO shards (unless elastic) and other ranks' kubellm state files."""
        out = []
        for f in manifest.files:
            if (m := _STATE_FILE_RE.search(f.path)) and int(m.group(1)) != rank:
                continue
            if not elastic and (m := _ZERO_SHARD_RE.search(f.path)) and int(m.group(1)) != dp_rank:
                continue
            out.append(f.path)
        if not any(_STATE_FILE_RE.search(p) for p in out):
            raise IntegrityError(
                f"{manifest.uri}: manifest lists no {STATE_FILE.format(rank=rank)} (this rank's RNG and "
                "data position); the checkpoint was not written by kubellm's CheckpointManager")
        return out

    def check_compatible(self, manifest: Manifest, engine: Any) -> None:
        """Refuse a checkpoint of another model shape or parallel layout, naming what differs."""
        meta = manifest.metadata
        problems = []
        differs = model_config_diff(manifest, self.model_config if self.model_config is not None
                                    else module_config(engine))
        if differs:
            problems.append(differs)
        if not problems and meta.get("param_shapes") is not None:
            have, want = meta["param_shapes"], param_shapes(engine)
            if int(getattr(engine, "num_stages", 1) or 1) > 1:
                # pipeline: the manifest holds rank 0's (first stage's) parameters; compare the shared ones
                have = {n: s for n, s in have.items() if n in want}
                want = {n: s for n, s in want.items() if n in have}
            diff = [f"{n}: checkpoint={have.get(n)}, this run={want.get(n)}"
                    for n in sorted(set(have) | set(want)) if have.get(n) != want.get(n)]
            if diff:
                more = f" (+{len(diff) - 5} more)" if len(diff) > 5 else ""
                problems.append("parameter shapes differ — " + "; ".join(diff[:5]) + more)
        if problems:
            raise CheckpointMismatchError(
                f"{join(manifest.uri, MANIFEST_NAME)}: checkpoint is from a different model: "
                + " | ".join(problems) + ". Use a new run prefix, or the matching model config.")
        have_layout = meta.get("layout") or {}
        want_layout = engine_layout(engine).as_dict()
        diff = [f"{k}: checkpoint={have_layout.get(k)}, this run={v}" for k, v in want_layout.items()
                if have_layout.get(k) != v]
        if diff:
            raise CheckpointMismatchError(
                f"{join(manifest.uri, MANIFEST_NAME)}: checkpoint was written with another parallel "
                f"layout ({'; '.join(diff)}); DeepSpeed's sharded checkpoints load only into the same "
                f"world size, DP/TP/PP degrees and ZeRO stage. {RESHARD_ROUTES}")

    # -- export

    @staticmethod
    def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
        """Collective; see `kubellm.training.consolidate.consolidated_state_dict`."""
        return consolidated_state_dict(engine)


