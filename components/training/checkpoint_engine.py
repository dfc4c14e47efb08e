"""Safe loading of DeepSpeed checkpoint files: `torch.load(weights_only=True)` with an allow-list.

    from kubellm.training.checkpoint_engine import install_safe_checkpoint_engine, safe_torch_load
    install_safe_checkpoint_engine(engine)       # engine.load_checkpoint(...) now never runs pickled code
    state = safe_torch_load("/staging/step-00000010/mp_rank_00_model_states.pt")

Why: DeepSpeed 0.19.8's `TorchCheckpointEngine.load` loads with weights_only=False, i.e.
full pickle — a checkpoint file (or anyone who can write to the bucket) could run arbitrary code in
every training pod. `SafeTorchCheckpointEngine` subclasses it and loads with `weights_only=True`;
torch's restricted unpickler then accepts tensors, containers and primitives plus exactly the
globals in `DEEPSPEED_SAFE_GLOBALS`. That list was found empirically
(`torch.serialization.get_unsafe_globals_in_checkpoint` on 2-rank checkpoints of ZeRO 0/1/2/3 in
fp32 and bf16): ZeRO optimizer shards pickle the loss scaler, the ZeRO stage enum and (stage 1/2)
the parameter-fragment addresses; model-state files hold only tensors and primitives. Anything else
is refused with an error naming the file and the global, before any of it is constructed.

kubellm's own training state files (`kubellm_state_rank*.pt`: RNG states, data position) need no
allow-list at all.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from kubellm.core.errors import IntegrityError


class UnsafeCheckpointError(IntegrityError):
    """A checkpoint file holds a pickled object outside the allow-list (never constructed)."""


def _deepspeed_safe_globals() -> list[Any]:
    # Imported here, not at module top, so a DeepSpeed refactor that moves one of them fails with a
    # message naming the missing type instead of an ImportError at `import kubellm.training`.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        LossScaler,  # ZeRO optimizer shards: `loss_scaler` (static scale, fp32/bf16)
        DynamicLossScaler,  # same, fp16 with dynamic loss scaling
        ZeroStageEnum,  # ZeRO optimizer shards: `zero_stage`
        fragment_address,  # ZeRO 1/2 shards: `param_slice_mappings` (NamedTuple of numel, start)
    ]


DEEPSPEED_SAFE_GLOBALS: list[Any] = _deepspeed_safe_globals()


def safe_torch_load(path: str | Path, map_location: Any = None,
                    extra_globals: list[Any] | None = None, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` with DeepSpeed's allow-list; a refused global raises
    `UnsafeCheckpointError` naming the file (nothing from it is constructed or called). `mmap`: map
    the tensors' storages instead of reading them (the whole pickle is still checked)."""
    allowed = DEEPSPEED_SAFE_GLOBALS + list(extra_globals or [])
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message names the offending global ("WeightsUnpickler error: Unsupported global:
        # GLOBAL os.system was not ..."); keep that sentence, drop the advice to pass
        # weights_only=False, which is exactly what must not happen here.
        text = str(e)
        # A blocked module (os, posix, builtins) reads "Trying to load unsupported GLOBAL posix.system
        # whose module posix is blocked." instead, with no "WeightsUnpickler error:" in front.
        found = (re.search(r"WeightsUnpickler error: ([^\n]*?)(?: Please use|$)", text, re.M)
                 or re.search(r"^([^\n]*\bGLOBAL \S+[^\n]*)$", text, re.M))
        reason = found.group(1).strip() if found else (text.strip().splitlines() or [type(e).__name__])[-1]
        raise UnsafeCheckpointError(
            f"{path}: refused to load — it pickles a type outside kubellm's allow-list for "
            f"DeepSpeed checkpoints ({reason}). The file is corrupt, from an unsupported DeepSpeed "
            "version, or crafted; it was not unpickled with weights_only=False."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise IntegrityError(f"{path}: not a readable torch checkpoint file: {e}") from e


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with `weights_only=True` loading (saving is unchanged).

    `loaded` counts files read, so callers and tests can prove nothing was unpickled before the
    sha256 verification finished."""

    def __init__(self, config_params: Any = None, on_load: Callable[[str], None] | None = None) -> None:
        super().__init__(config_params)
        self.name = "KubellmSafeTorchCheckpointEngine"
        self.loaded: list[str] = []
        self._on_load = on_load

    def load(self, path: str, map_location: Any = None) -> Any:
        if self._on_load is not None:
            self._on_load(path)
        self.loaded.append(str(path))
        return safe_torch_load(path, map_location=map_location)


def install_safe_checkpoint_engine(engine: Any) -> SafeTorchCheckpointEngine:
    """Replace `engine.checkpoint_engine` with a `SafeTorchCheckpointEngine` (keeping its zipfile
    serialization setting) and return it. Idempotent. Refuses decoupled/asynchronous engines
    (Nebula, FastPersist, DataStates), whose files kubellm could not upload consistently."""
    current = getattr(engine, "checkpoint_engine", None)
    if isinstance(current, SafeTorchCheckpointEngine):
        return current
    if current is not None and type(current) is not TorchCheckpointEngine:
        raise TypeError(
            f"engine.checkpoint_engine is {type(current).__name__}; kubellm checkpoints need "
            "DeepSpeed's TorchCheckpointEngine (remove `nebula`/`checkpoint.writer` from the "
            "DeepSpeed config)"
        )
    safe = SafeTorchCheckpointEngine()
    if current is not None:
        safe.zipfile_serialization = current.zipfile_serialization
    engine.checkpoint_engine = safe
    return safe
