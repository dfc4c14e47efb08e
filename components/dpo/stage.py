"""The DPO stage: align a model artifact (the SFT model) with preference pairs.

    kubellm dpo --preset debug --input model=<sft artifact> --input preferences=.kubellm/demo/preferences \
        --output .kubellm/artifacts

`preferences` is JSON lines of `{"prompt", "chosen", "rejected"}` (prompt: text or a messages list).
The starting model is also the frozen reference. With `reference: cached` its log-probabilities are
computed once (rank 0), stored in the run dir (`reference/ref_logps.npy`, reused on resume) and
named in the model manifest's metadata; with `reference: live` a frozen copy scores every batch. Reports reward
accuracy and margin before (0.5 / 0 by construction) and after training.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kubellm.core.manifest import Manifest, content_prefix
from kubellm.core.storage import join, storage_for
from kubellm.dpo.config import DPOConfig
from kubellm.sft.data import SkipReport
from kubellm.sft.stage import config_hash, no_usable_records, source_fingerprint, stage_jsonl
from kubellm.training.job import JobSpec
from kubellm.training.model_stage import fetch_model, launch_or_run, publish_model, start_worker

STAGE = "dpo"
REF_FILE = "reference/ref_logps.npy"


def run(config: DPOConfig, inputs: Mapping[str, str], output: str) -> Manifest:
    base = fetch_model(inputs["model"], fetch_here=False)  # shape and digest only: the workers fetch the weights
    parents = {"model": base.digest, "preferences": source_fingerprint(inputs["preferences"])}
    prefix = content_prefix(output, STAGE, config_hash(config), parents)
    return launch_or_run(STAGE, config, inputs, output, prefix, run_worker, model_cfg=base.config)


def _cached_reference(spec: JobSpec, reference: object, arrays: list[dict[str, np.ndarray]], rank: int,
                      world: int) -> np.ndarray:
    """(N, 2) reference log-probs: computed once by rank 0 into the run dir, read by every rank."""
    import torch.distributed as dist

    from kubellm.dpo.objective import precompute_reference

    uri = join(spec.run_dir, REF_FILE)
    st = storage_for(uri)
    if rank == 0 and not st.exists(uri):
        precompute_reference(reference, arrays)  # type: ignore[arg-type]
        buf = io.BytesIO()
        np.save(buf, np.stack([a["ref_logps"] for a in arrays]), allow_pickle=False)
        st.write_bytes(uri, buf.getvalue())
    if world > 1:
        dist.barrier()
    ref = np.load(io.BytesIO(st.read_bytes(uri)), allow_pickle=False)
    if ref.shape != (len(arrays), 2):
        raise ValueError(f"{uri}: reference log-probs have shape {ref.shape}, expected ({len(arrays)}, 2) "
                         "— the preference data changed since they were computed; use a new run dir")
    return ref


def run_worker(spec: JobSpec) -> Manifest | None:
    import torch

    from kubellm.dpo.data import read_preferences_jsonl, to_arrays
    from kubellm.dpo.objective import DPOObjective
    from kubellm.model.hf import load_hf
    from kubellm.training.engine import train

    config = DPOConfig.model_validate(spec.config)
    w = start_worker(spec, config.train)
    rank, world, base, tok = w.rank, w.world, w.base, w.tokenizer
    reference, model_cfg = w.model, w.model_config
    reference.eval().requires_grad_(False)
    report = SkipReport()
    with tempfile.TemporaryDirectory(prefix="kubellm-dpo-") as tmp:
        pairs = read_preferences_jsonl(stage_jsonl(spec.inputs["preferences"], Path(tmp)), tok,
                                       config.train.seq_len, report, config.on_bad_record)
    if not pairs:
        raise no_usable_records("preference pairs", spec.inputs["preferences"], report)
    arrays = to_arrays(pairs, config.train.seq_len, tok.pad_token_id)
    if config.reference == "cached":
        ref = _cached_reference(spec, reference, arrays, rank, world)
        for a, r in zip(arrays, ref, strict=True):
            a["ref_logps"] = r
        objective = DPOObjective(arrays, config.beta, config.label_smoothing, config.loss_type)
    else:
        objective = DPOObjective(arrays, config.beta, config.label_smoothing, config.loss_type, reference=reference)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    result = train(model_cfg, config.train, config.parallel, objective, spec.run_dir, init_state_dict=start,
                   resume=True)
    if rank != 0:
        return None
    # reward accuracy / margin of the trained policy over all pairs, against the same reference
    policy, _ = load_hf(base.hf_dir)
    policy.load_state_dict(result.final_state_dict)
    policy.eval()
    scorer = DPOObjective(arrays, config.beta, config.label_smoothing, config.loss_type, reference=reference)
    with torch.no_grad():
        _, m = scorer.loss(policy, next(scorer.build_loader(0, 1, len(arrays), config.train.seed)))
    after = {f"final_{k}": float(v) for k, v in m.items()}
    skipped = report.summary()
    manifest = publish_model(
        spec, stage=STAGE, model_cfg=model_cfg, result=result, tokenizer_dir=base.hf_dir,
        parents={"model": base.digest, "preferences": source_fingerprint(spec.inputs["preferences"])},
        config_hash=config_hash(config),
        title=f"DPO ({config.loss_type}, beta {config.beta}, reference {config.reference}): {len(pairs)} pairs",
        counts={"pairs": len(pairs), "skipped_records": report.total},
        metrics=after,
        report_lines=[f"Reward accuracy 0.50 → {after['final_reward_accuracy']:.2f}, margin 0.00 → "
                      f"{after['final_reward_margin']:.3f} (all {len(pairs)} pairs).", "",
                      f"Skipped records: {skipped}.", *(f"- {e}" for e in report.examples[:5])],
        metadata={"base_model": base.manifest.uri if base.manifest else str(base.hf_dir),
                  "reference": config.reference, "skipped": report.counts,
                  "reference_logps": join(spec.run_dir, REF_FILE) if config.reference == "cached" else None},
    )
    return manifest
