"""`validate_layout` when tp × pp does not divide the world size: the refusal says so, never shows a
parallel.dp the user did not set, and suggests only fixes that pass `validate_layout` themselves."""

from __future__ import annotations

import re

import pytest

from kubellm.core.errors import ConfigError
from kubellm.model.config import get_preset
from kubellm.training.config import ParallelConfig, TrainConfig
from kubellm.training.topology import validate_layout

MODEL = get_preset("seed")  # 8 heads, 8 KV heads, ffn 256, vocab 10000, 6 layers
TRAIN = TrainConfig(global_batch_size=48, micro_batch_size=1)


def _refusal(parallel: ParallelConfig, world: int) -> str:
    with pytest.raises(ConfigError) as e:
        validate_layout(MODEL, TRAIN, parallel, world)
    return str(e.value)


def _suggested(msg: str) -> tuple[list[int], list[int], list[int]]:
    """(process counts with parallel.dp unset, tp values, pp values) the message suggests."""
    worlds = re.search(r"launch a multiple of \d+ processes \(([^)]*)\)", msg)
    tps = re.search(r"parallel\.tp in \{([^}]*)\}", msg)
    pps = re.search(r"parallel\.pp in \{([^}]*)\}", msg)
    return ([int(w) for w in worlds.group(1).split(" or ")] if worlds else [],
            [int(t) for t in tps.group(1).split(", ")] if tps else [],
            [int(p) for p in pps.group(1).split(", ")] if pps else [])


@pytest.mark.parametrize(("parallel", "world"), [
    (ParallelConfig(tp=2), 3),
    (ParallelConfig(tp=2, pp=2), 6),
    (ParallelConfig(tp=4, pp=2), 12),
    (ParallelConfig(tp=2), 7),
    (ParallelConfig(dp=2, tp=2), 5),
])
def test_world_not_a_multiple_of_tp_pp_is_named_and_fixes_are_valid(parallel: ParallelConfig, world: int) -> None:
    msg = _refusal(parallel, world)
    mp = parallel.tp * parallel.pp
    assert msg.startswith(f"{world} process(es) (launch.nproc_per_node × launch.nnodes) is not a multiple "
                          f"of tp × pp = {mp} (parallel.tp={parallel.tp} × pp={parallel.pp}), "
                          "so no parallel.dp fits; "), msg
    if parallel.dp is None:
        assert "parallel.dp=" not in msg  # the user set none, and no dp fits this world size
    else:
        fixed = re.search(r"launch (\d+) processes \(parallel\.dp=", msg)
        assert fixed, msg
        validate_layout(MODEL, TRAIN, parallel, int(fixed.group(1)))
    worlds, tps, pps = _suggested(msg)
    assert worlds and world not in worlds
    for w in worlds:  # each suggested process count runs with tp and pp as they are, dp unset
        validate_layout(MODEL, TRAIN, parallel.model_copy(update={"dp": None}), w)
    for t in tps:  # each suggested tp runs on this world size with pp kept
        validate_layout(MODEL, TRAIN, ParallelConfig(tp=t, pp=parallel.pp), world)
    for p in pps:
        validate_layout(MODEL, TRAIN, ParallelConfig(tp=parallel.tp, pp=p), world)


def test_examples() -> None:
    # global batch 48, micro 1: dp must divide 48
    assert _suggested(_refusal(ParallelConfig(tp=2, pp=2), 6)) == ([4, 8], [1], [1, 3])
    assert _suggested(_refusal(ParallelConfig(tp=2), 3)) == ([2, 4], [1], [])
    assert _suggested(_refusal(ParallelConfig(tp=2), 7)) == ([6, 8], [], [])  # tp=1 → dp=7: 48 % 7
    msg = _refusal(ParallelConfig(tp=4), 18)  # 20 → dp=5 does not divide 48: skipped for 24
    assert _suggested(msg) == ([16, 24], [], [])
    assert "launch 4 processes (parallel.dp=2 × tp × pp)" in _refusal(ParallelConfig(dp=2, tp=2), 5)


def test_a_wrong_dp_on_a_divisible_world_suggests_the_dp_that_fits() -> None:
    msg = _refusal(ParallelConfig(dp=3, tp=2), 4)
    assert "parallel.dp=3 × tp=2 × pp=1 = 6 but the job has 4 process(es)" in msg
    assert "make them equal: parallel.dp=2," in msg
    assert validate_layout(MODEL, TRAIN, ParallelConfig(dp=2, tp=2), 4).dp == 2
