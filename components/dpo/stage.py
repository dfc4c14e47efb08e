"""The DPO stage: align a model artifact (the SFT model) with preference pairs.

    kubellm dpo --preset debug --input model=<sft artifact> --input preferences=.kubellm/demo/preferences \
        --output .kubellm/artifacts

`preferences` is JSON lines of `{"prompt", "chosen", "rejected"}` (prompt: text or a messages list).
The starting model is also the frozen reference. With `reference: cached` its log-probabilities are
computed once (split across the ranks, on the training device and in the training precision), stored in the run dir
(`reference/ref_logps-<key>.npy`, keyed on the model, the tokenized pairs, device and precision;
reused on resume) and named in the model manifest's metadata; with `reference: live` a frozen copy
scores every batch. Every `heldout_every`-th pair is held out of training; the report gives the
trained policy's loss, reward accuracy and margin on the held-out pairs and on the trained ones
(rewards are 0 at the start, where the policy is the reference, and the sigmoid loss is log 2).
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kubellm.core.errors import IntegrityError
from kubellm.core.manifest import Manifest, content_prefix, stable_hash
from kubellm.core.storage import join, storage_for
from kubellm.dpo.config import DPOConfig
from kubellm.sft.data import SkipReport
from kubellm.sft.stage import config_hash, hold_out, no_usable_records, source_fingerprint, stage_jsonl
from kubellm.training.job import JobSpec
from kubellm.training.model_stage import fetch_model, launch_or_run, publish_model, start_worker

STAGE = "dpo"
SCORE_BATCH = 16


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


def _cached_reference(spec: JobSpec, reference: object, arrays: list[dict[str, np.ndarray]], rank: int,
                      world: int, config: DPOConfig, device: str) -> tuple[np.ndarray, str]:
    """(N, 2) reference log-probs and their file in the run dir: computed once, on the training device
    and in the training precision, each rank scoring every `world`-th pair (so no rank idles at a
    collective while one scores them all), gathered, and written by rank 0; read back where it exists."""
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
        with train_autocast(config.train, device):
            precompute_reference(reference.to(device), mine)  # type: ignore[attr-defined]
        reference.to("cpu")  # type: ignore[attr-defined]
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


def _score(policy: object, reference: object, arrays: list[dict[str, np.ndarray]], config: DPOConfig,
           device: str) -> dict[str, float]:
    """Loss and reward metrics of `policy` over `arrays`, in batches (one batch of every pair would hold the
    activations of 2N sequences at once), on the training device and precision; means over pairs."""
    import torch

    from kubellm.dpo.objective import DPOObjective
    from kubellm.training.engine import train_autocast, weight_dtype

    scorer = DPOObjective(arrays, config.beta, config.label_smoothing, config.loss_type,
                          reference=reference)  # unused with cached log-probs; else moved to the batch's device
    policy.to(device, weight_dtype(config.train, device)).eval()  # type: ignore[attr-defined]
    totals: dict[str, float] = {}
    with torch.no_grad(), train_autocast(config.train, device):
        for i in range(0, len(arrays), SCORE_BATCH):
            rows = arrays[i : i + SCORE_BATCH]
            batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])).to(device) for k in rows[0]
                     if k in ("input_ids", "labels", "ref_logps")}  # cached log-probs stand in for the reference
            loss, m = scorer.loss(policy, batch)
            for k, v in {"loss": loss, **m}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(rows)
    return {k: v / len(arrays) for k, v in totals.items()}


def run_worker(spec: JobSpec) -> Manifest | None:

    from kubellm.dpo.data import read_preferences_jsonl, to_arrays
    from kubellm.dpo.objective import DPOObjective
    from kubellm.model.hf import load_hf
    from kubellm.training.engine import resolve_device, train, weight_dtype

    config = DPOConfig.model_validate(spec.config)
    device = resolve_device(config.train.device)
    w = start_worker(spec, config.train)
    rank, world, base, tok = w.rank, w.world, w.base, w.tokenizer
    reference, model_cfg = w.model, w.model_config
    # the policy starts from the fp32 weights; the frozen reference computes as the policy's weights do
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    reference.to(weight_dtype(config.train, device)).eval().requires_grad_(False)
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
        ref, ref_uri = _cached_reference(spec, reference, arrays, rank, world, config, device)
        for a, r in zip(arrays, ref, strict=True):
            a["ref_logps"] = r
        objective = DPOObjective(train_arrays, config.beta, config.label_smoothing, config.loss_type,
                                 pad_id=tok.pad_token_id)
    else:
        objective = DPOObjective(train_arrays, config.beta, config.label_smoothing, config.loss_type,
                                 reference=reference, pad_id=tok.pad_token_id)
    result = train(model_cfg, config.train, config.parallel, objective, spec.run_dir, init_state_dict=start,
                   resume=True, identity=spec.identity)
    if rank != 0:
        return None
    # loss, reward accuracy and margin of the trained policy on the held-out and the trained pairs,
    # against the same reference
    policy, _ = load_hf(base.hf_dir)
    policy.load_state_dict(result.final_state_dict)
    after = {f"final_{k}": v for k, v in _score(policy, reference, train_arrays, config, device).items()}
    after |= {f"heldout_{k}": v for k, v in _score(policy, reference, held_arrays, config, device).items()}
    skipped = report.summary()
    manifest = publish_model(
        spec, stage=STAGE, model_cfg=model_cfg, result=result, tokenizer_dir=base.hf_dir,
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
