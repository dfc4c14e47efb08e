"""kubellm plan times each collective at the link it crosses: DP all-reduces and pipeline sends
inside one node at NVLink speed, across nodes at `--interconnect`'s, with ranks placed in the
worker's (DeepSpeed's) pipe/data/model order."""

from __future__ import annotations

import dataclasses

import pytest

from kubellm.model.config import get_preset
from kubellm.training.planner import (
    INTERCONNECTS,
    Request,
    collective_spans_nodes,
    enumerate_layouts,
    plan,
)


def _key(lay):  # noqa: ANN001, ANN202
    return (lay.dp, lay.tp, lay.pp, lay.zero, lay.micro_batch, lay.act_ckpt)


def test_single_node_ranking_does_not_depend_on_the_interconnect() -> None:
    """Every GPU on one NVLink node: no traffic crosses --interconnect, so the ranking and the times
    are the same for each (was: DP and PP timed at the inter-node link, ib picked dp=2 pp=4 and
    nvlink dp=8 ZeRO-2)."""
    req = Request(model=get_preset("1b"), gpus=8, gpus_per_node=8, global_batch=64)
    ranked = {ic: [(_key(lay), lay.step_s) for lay in plan(dataclasses.replace(req, interconnect=ic), top=40)]
              for ic in INTERCONNECTS}
    assert all(r == ranked["nvlink"] for r in ranked.values()), {ic: r[0] for ic, r in ranked.items()}
    assert ranked["ib"][0][0][:3] == (8, 1, 1)  # plain data parallelism over NVLink wins


def test_spans_follow_the_workers_rank_order() -> None:
    """`collective_spans_nodes` against DeepSpeed's own topology (what `make_grid` builds): node =
    rank // gpus_per_node, a DP group spans nodes when its ranks do, a pipeline hop when the two
    neighbouring stages' ranks sit on different nodes."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    checked = 0
    for gpn in (1, 2, 4, 6, 8):
        for world in range(1, 3 * gpn + 1):
            if world > gpn and world % gpn:
                continue  # the planner's rule: a multi-node job fills whole nodes
            for tp in (t for t in range(1, gpn + 1) if gpn % t == 0 and world % t == 0):
                for pp in (p for p in range(1, world // tp + 1) if (world // tp) % p == 0):
                    dp = world // (tp * pp)
                    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
                    dp_spans = dp > 1 and any(len({r // gpn for r in g}) > 1
                                              for g in topo.get_axis_comm_lists("data"))
                    pp_spans = any(a // gpn != b // gpn for g in topo.get_axis_comm_lists("pipe")
                                   for a, b in zip(g, g[1:], strict=False))
                    assert collective_spans_nodes(gpn, dp, tp, pp) == (dp_spans, pp_spans), (gpn, dp, tp, pp)
                    checked += 1
    assert checked > 100


@pytest.mark.parametrize(("dp", "tp", "pp", "expected"), [
    (8, 1, 1, (False, False)),   # one node
    (16, 1, 1, (True, False)),   # DP over two nodes
    (8, 1, 2, (False, True)),    # a stage per node: DP inside, the one hop across
    (2, 1, 8, (False, True)),    # stages 3 → 4 (ranks 6,7 → 8,9) cross
    (2, 8, 1, (True, False)),    # TP fills the node, DP pairs nodes
    (3, 2, 4, (True, True)),     # 24 GPUs: a stage's 6 ranks straddle nodes
])
def test_spans_examples(dp: int, tp: int, pp: int, expected: tuple[bool, bool]) -> None:
    assert collective_spans_nodes(8, dp, tp, pp) == expected


def test_multi_node_times_only_the_crossing_traffic_at_the_interconnect() -> None:
    """16 GPUs on two nodes: with dp=8 × pp=2 the all-reduce stays inside each node and only the
    pipeline hop crosses, so changing the interconnect moves the step time by the PP bytes alone;
    with dp=16 the all-reduce crosses and moves it by the DP bytes."""
    cfg = get_preset("1b")
    req = Request(model=cfg, gpus=16, gpus_per_node=8, global_batch=64, seq_len=2048)
    by_ic = {ic: {_key(lay): lay for lay in enumerate_layouts(dataclasses.replace(req, interconnect=ic))}
             for ic in ("ib", "ethernet")}
    slow, fast = INTERCONNECTS["ethernet"] * 1e9, INTERCONNECTS["ib"] * 1e9

    key = (8, 1, 2, 1, 1, False)
    m = req.global_batch // (8 * 1)
    pp_bytes = 2 * m * req.seq_len * 1 * cfg.dim * 2
    assert by_ic["ethernet"][key].step_s - by_ic["ib"][key].step_s == pytest.approx(
        pp_bytes / slow - pp_bytes / fast, rel=1e-9)

    key = (16, 1, 1, 1, 1, False)
    dp_bytes = by_ic["ib"][key].comm_gb * 1e9  # dp > 1, tp = pp = 1: the all-reduce is all of it
    assert by_ic["ethernet"][key].step_s - by_ic["ib"][key].step_s == pytest.approx(
        dp_bytes / slow - dp_bytes / fast, rel=1e-9)
