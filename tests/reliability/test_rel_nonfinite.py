"""NaN/Inf losses and loss spikes: seen by every rank before the optimizer step, skipped and counted
(or the run stops with the last checkpoint intact), through the real DeepSpeed engine, 2 processes.

    .venv/bin/python -m pytest tests/reliability/test_rel_nonfinite.py -q

One 2-process run per ZeRO stage (0 and 1) injects, with `train.nonfinite=skip`, a NaN loss on rank 1
at step 3, infinite gradients under a finite loss on rank 0 at step 5 (ZeRO 0: kubellm's grad-norm
check; ZeRO 1: DeepSpeed's own overflow skip, counted by kubellm) and a 50× loss spike on rank 0 at
step 7 (`spike_sigma=3` over a 4-step window). A
skipped step must leave every parameter bit-identical (sha256 of the parameters at the start of each step),
an applied step must change them, and the counts must be in metrics.jsonl and the run summary.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from relkit import make_shards, run_faulty

from kubellm.training.spawn import spawn

NAN_STEP, GRAD_STEP, SPIKE_STEP = 3, 5, 7
FAULTS = {(NAN_STEP, 1): float("nan"), (GRAD_STEP, 0): "grad_inf", (SPIKE_STEP, 0): 50.0}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return make_shards(tmp_path_factory.mktemp("nonfinite-shards"))


@pytest.mark.integration
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_nan_and_spike_are_skipped_on_all_ranks(shards: list[str], tmp_path: Path, zero_stage: int) -> None:
    kw = dict(zero_stage=zero_stage, nonfinite="skip", spike_sigma=3.0, spike_window=4, max_steps=9)
    ranks = spawn(run_faulty, 2, shards, str(tmp_path / "run"), FAULTS, kw, 2)
    r0, r1 = ranks
    assert r0["losses"] == r1["losses"] or all(  # NaN != NaN: compare with NaN-aware equality
        (a == b) or (math.isnan(a) and math.isnan(b)) for a, b in zip(r0["losses"], r1["losses"], strict=True))
    for r in ranks:  # the skipped steps leave the parameters exactly as they were, on every rank
        p = r["params"]
        for skipped in (NAN_STEP, GRAD_STEP, SPIKE_STEP):
            assert p[skipped] == p[skipped + 1], f"step {skipped} changed the parameters"
        for applied in (1, 2, 4, 6, 8):
            assert p[applied] != p[applied + 1], f"step {applied} did not update"
    assert r0["params"][9] == r1["params"][9]  # ranks stayed in lockstep
    rows = {int(row["step"]): row for row in r0["rows"]}
    assert math.isnan(rows[NAN_STEP]["loss"]) and rows[NAN_STEP]["skipped"] == 1.0
    assert rows[SPIKE_STEP]["skipped"] == 1.0 and rows[SPIKE_STEP]["loss"] > 10 * rows[SPIKE_STEP - 1]["loss"]
    assert math.isfinite(rows[GRAD_STEP]["loss"]) and not math.isfinite(rows[GRAD_STEP]["grad_norm"])
    assert [s for s, row in rows.items() if row["skipped"]] == [NAN_STEP, GRAD_STEP, SPIKE_STEP]
    assert rows[9]["skipped_nonfinite"] == 2.0 and rows[9]["skipped_spike"] == 1.0
    assert r0["summary"]["skipped_nonfinite"] == 2.0 and r0["summary"]["skipped_spike"] == 1.0
    finite = [x for s, x in enumerate(r0["losses"], 1) if s not in (NAN_STEP, SPIKE_STEP)]
    assert all(math.isfinite(x) for x in finite) and finite[-1] < finite[0]  # training went on


@pytest.mark.integration
def test_inf_loss_stops_before_the_update_with_the_checkpoint_intact(shards: list[str], tmp_path: Path) -> None:
    from kubellm.training.checkpoint import CheckpointManager

    run = tmp_path / "run"
    kw = dict(zero_stage=1, nonfinite="stop", checkpoint_every=2, keep_checkpoints=1, max_steps=8)
    ranks = spawn(run_faulty, 2, shards, str(run), {(5, 0): float("inf")}, kw, 2)
    for r in ranks:  # both ranks stop at the same step, with the same message
        assert "at step 5" in r["error"] and "train.nonfinite=skip" in r["error"], r["error"]
        assert max(r["params"]) == 5
    latest = CheckpointManager(str(run / "checkpoints")).latest()
    assert latest is not None and latest.metadata["step"] == 4  # committed, nothing after it
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004"]
