"""The DPO stage: align a model artifact (the SFT model) with preference pairs.

    kubellm dpo --preset debug --input model=<sft artifact> --input preferences=.kubellm/demo/preferences \
        --output .kubellm/artifacts

`preferences` is JSON lines of `{"prompt", "chosen", "rejected"}` (prompt: text or a messages list).
The starting model is also the frozen reference. With `reference: cached` its log-probabilities are
computed once (split across the ranks, on the training device and in the training precision), stored in the run dir
(`reference/ref_logps-<key>.npy`, keyed on the model, the tokenized pairs, device and precision;
reused on resume) and named in the model manifest's metadata; with `reference: live` a frozen copy
scores every batch; either way the reference is loaded on the training device in the precision the
policy's weights compute in (cached: only while the log-probabilities are computed). The policy starts
from the base's fp32 weights, read tensor by tensor as each rank fills its model. Every
`heldout_every`-th pair is held out of training; the report gives the trained policy's loss, reward
accuracy and margin on the held-out pairs and on the trained ones, scored through the training engine
after the last step (rewards are 0 at the start, where the policy is the reference, and the sigmoid
loss is log 2).
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kubellm.core.errors import IntegrityError
from kubellm.core.manifest import Manifest, content_prefix, stable_hash
from kubellm.core.storage import join, storage_for
from kubellm.dpo.config import DPOConfig
from kubellm.sft.data import SkipReport
from kubellm.sft.stage import config_hash, hold_out, no_usable_records, source_fingerprint, stage_jsonl
from kubellm.training.job import JobSpec
from kubellm.training.model_stage import (
    export_trained,
    fetch_model,
    launch_or_run,
    publish_model,
    start_worker,
)

STAGE = "dpo"


def run(config: DPOConfig, inputs: Mapping[str, str], output: str) -> Manifest:
    base = fetch_model(inputs["model"], fetch_here=False)  # shape and digest only: the workers fetch the weights
    parents = {"model": base.digest, "preferences": source_fingerprint(inputs["preferences"])}
    prefix = content_prefix(output, STAGE, config_hash(config), parents)
    return launch_or_run(STAGE, config, inputs, output, prefix, run_worker, model_cfg=base.config, parents=parents)


def reference_uri(spec: JobSpec, arrays: list[dict[str, np.ndarray]], config: DPOConfig, device: str) -> str:
    """Where the cached reference log-probs of these pairs live in the run dir: keyed on the starting
    model, the tokenized pairs themselves, and the device, precision and weight dtype that score them, so a run dir
    reused with other data, another model or another precision never reads stale values."""
    from kubellm.training.engine import weight_dtype

    h = hashlib.sha256()
    for a in arrays:
        for k in ("input_ids", "labels"):
            h.update(str(a[k].shape).encode())
            h.update(np.ascontiguousarray(a[k]).tobytes())
    key = stable_hash({"model": spec.parents.get("model", ""), "pairs": h.hexdigest(),
                       "precision": config.train.precision, "device": device,
                       "weights": str(weight_dtype(config.train, device))})
    return join(spec.run_dir, f"reference/ref_logps-{key}.npy")


def _cached_reference(spec: JobSpec, load_reference: Callable[[], Any], arrays: list[dict[str, np.ndarray]],
                      rank: int, world: int, config: DPOConfig, device: str) -> tuple[np.ndarray, str]:
    """(N, 2) reference log-probs and their file in the run dir: computed once, on the training device
    and in the training precision, each rank scoring every `world`-th pair (so no rank idles at a
    collective while one scores them all), gathered, and written by rank 0; read back where it exists.
    The reference model is loaded (`load_reference`) only to compute them, and freed before training."""
    import torch
    import torch.distributed as dist

    from kubellm.dpo.objective import precompute_reference
    from kubellm.model.parallel import collective_device
    from kubellm.training.engine import train_autocast

    uri = reference_uri(spec, arrays, config, device)
    st = storage_for(uri)
    todo = [not st.exists(uri)]
    if world > 1:  # one decision for every rank: rank 0's
        dist.broadcast_object_list(todo, src=0)
    if todo[0]:
        mine = arrays[rank::world]
        reference = load_reference()
        with train_autocast(config.train, device):
            precompute_reference(reference, mine)
        del reference
        ref = np.stack([a["ref_logps"] for a in mine]) if mine else np.zeros((0, 2))
        if world > 1:
            per = -(-len(arrays) // world)  # ranks hold ⌈N/world⌉ or one fewer pairs: pad to gather
            on = collective_device()  # NCCL gathers device tensors, gloo host ones
            part = torch.zeros(per, 2, dtype=torch.float64, device=on)
            part[: len(mine)] = torch.from_numpy(ref).to(on)
            parts = [torch.empty_like(part) for _ in range(world)]
            dist.all_gather(parts, part)
            ref = np.empty((len(arrays), 2))
            for r, got in enumerate(parts):
                ref[r::world] = got[: len(range(r, len(arrays), world))].cpu().numpy()
        if rank == 0:
            buf = io.BytesIO()
            np.save(buf, ref, allow_pickle=False)
            st.write_bytes(uri, buf.getvalue())
        if world > 1:
            dist.barrier()  # the file exists for a later resume before any rank trains
        return ref, uri
    ref = np.load(io.BytesIO(st.read_bytes(uri)), allow_pickle=False)
    if ref.shape != (len(arrays), 2):
        raise IntegrityError(f"{uri}: reference log-probs have shape {ref.shape}, expected ({len(arrays)}, 2); "
                             "the file is damaged: delete it to recompute")
    return ref, uri


def run_worker(spec: JobSpec) -> Manifest | None:

    from kubellm.dpo.data import read_preferences_jsonl, to_arrays
    from kubellm.dpo.objective import DPOObjective
    from kubellm.model.hf import load_hf
    from kubellm.training.engine import train, weight_dtype
    from kubellm.training.evaluation import Evaluation
    from kubellm.training.process_group import resolve_device

    config = DPOConfig.model_validate(spec.config)
    device = resolve_device(config.train.device)
    w = start_worker(spec, config.train)
    rank, world, base, tok, model_cfg = w.rank, w.world, w.base, w.tokenizer, w.model_config

    def load_reference() -> Any:
        """The frozen reference, loaded on the training device in the dtype the policy's weights compute
        in (the policy itself starts from the base's fp32 weights, `w.weights`, read tensor by tensor)."""
        reference, _ = load_hf(base.hf_dir, dtype=weight_dtype(config.train, device), device=device)
        return reference.eval().requires_grad_(False)

    report = SkipReport()
    with tempfile.TemporaryDirectory(prefix="kubellm-dpo-") as tmp:
        staged = stage_jsonl(spec.inputs["preferences"], Path(tmp))
        pairs = read_preferences_jsonl(list(staged), tok, config.train.seq_len, report, config.on_bad_record,
                                       labels=staged)
    if not pairs:
        raise no_usable_records("preference pairs", spec.inputs["preferences"], report)
    arrays = to_arrays(pairs, config.train.seq_len, tok.pad_token_id)
    train_arrays, held_arrays = hold_out(arrays, config.heldout_every, "preference pair(s)",
                                         spec.inputs["preferences"], report)
    ref_uri = None
    if config.reference == "cached":  # held-out pairs too: they are scored against the same reference
        ref, ref_uri = _cached_reference(spec, load_reference, arrays, rank, world, config, device)
        for a, r in zip(arrays, ref, strict=True):
            a["ref_logps"] = r
        objective = DPOObjective(train_arrays, config.beta, config.label_smoothing, config.loss_type,
                                 pad_id=tok.pad_token_id)
    else:
        objective = DPOObjective(train_arrays, config.beta, config.label_smoothing, config.loss_type,
                                 reference=load_reference(), pad_id=tok.pad_token_id)
    # loss, reward accuracy and margin of the trained policy on the held-out and the trained pairs, against
    # the same reference, scored through the training engine after the last step
    result = train(model_cfg, config.train, config.parallel, objective, spec.run_dir, init_state_dict=w.weights,
                   resume=True, identity=spec.identity,
                   evaluate={"final": Evaluation(train_arrays), "heldout": Evaluation(held_arrays)},
                   consolidate_final=False)
    out = export_trained(result, model_cfg, STAGE, base.hf_dir)  # every rank: written a shard at a time
    if out is None:
        return None
    after = {f"{name}_{k}": v for name in ("final", "heldout") for k, v in result.scores["end"][name].items()}
    skipped = report.summary()
    manifest = publish_model(
        spec, out, stage=STAGE, model_cfg=model_cfg, result=result,
        parents=spec.parents,
        config_hash=config_hash(config),
        title=f"DPO ({config.loss_type}, beta {config.beta}, reference {config.reference}): "
              f"{len(train_arrays)} pairs",
        counts={"pairs": len(train_arrays), "heldout_pairs": len(held_arrays), "skipped_records": report.total},
        metrics=after,
        report_lines=["| pairs | count | loss | reward accuracy | reward margin |", "|---|---:|---:|---:|---:|",
                      *(f"| {name} | {n} | {after[p + 'loss']:.4f} | {after[p + 'reward_accuracy']:.2f} | "
                        f"{after[p + 'reward_margin']:.3f} |"
                        for name, n, p in (("held out", len(held_arrays), "heldout_"),
                                           ("trained on", len(train_arrays), "final_"))),
                      "", "After training. At the start the policy is the reference: rewards, accuracy and "
                      "margin are 0" + (" and the loss is log 2 = 0.6931." if config.loss_type == "sigmoid"
                                        else f" and the loss is 1/(2β)² = {1 / (2 * config.beta) ** 2:.4f}."),
                      "",
                      f"Skipped records: {skipped}.", *(f"- {e}" for e in report.examples[:5])],
        metadata={"base_model": base.manifest.uri if base.manifest else str(base.hf_dir),
                  "reference": config.reference, "skipped": report.counts,
                  "reference_logps": ref_uri if config.reference == "cached" else None},
    )
    return manifest
