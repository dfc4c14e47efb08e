"""kubellm plan offers only layouts the pretrain worker accepts: enumerate_layouts asks
`validate_layout` itself (tp must divide heads, KV heads, ffn_dim and the vocabulary; pp ≤ layers; ZeRO ≤ 1
with pp; global = micro × accum × dp)."""

from __future__ import annotations

import pytest

from kubellm.model.config import get_preset
from kubellm.training.config import ParallelConfig, TrainConfig
from kubellm.training.planner import Request, enumerate_layouts, model_for_params, plan
from kubellm.training.topology import validate_layout

REQUESTS = {
    "125m-gpus3-batch3": Request(model=get_preset("125m"), gpus=3, gpu_mem_gb=8, global_batch=3),
    "125m-gpus6": Request(model=get_preset("125m"), gpus=6, gpus_per_node=6, global_batch=48),
    "1b-gpus8": Request(model=get_preset("1b"), gpus=8, seq_len=4096),
    "params3e9-gpus14": Request(model=model_for_params(3e9), gpus=14, gpus_per_node=14, global_batch=56),
    "7b-gpus16": Request(model=get_preset("7b"), gpus=16, global_batch=64),
}


@pytest.mark.parametrize("req", REQUESTS.values(), ids=REQUESTS.keys())
def test_every_layout_considered_is_one_pretrain_accepts(req: Request) -> None:
    layouts = enumerate_layouts(req)
    assert layouts
    for lay in layouts:
        train = TrainConfig(zero_stage=lay.zero, micro_batch_size=lay.micro_batch,  # type: ignore[arg-type]
                            global_batch_size=req.global_batch, seq_len=req.seq_len)
        validate_layout(req.model, train, ParallelConfig(dp=lay.dp, tp=lay.tp, pp=lay.pp), req.gpus)


def test_tp_that_does_not_divide_ffn_or_vocab_is_not_offered() -> None:
    # 125m: 12 heads (3 divides them) but ffn_dim 2048 and vocab 32000 (3 divides neither)
    layouts = plan(REQUESTS["125m-gpus3-batch3"], top=100)
    assert layouts and all(lay.tp == 1 for lay in layouts)
    # 3e9 by --params: 14 heads; tp 7 and 14 divide them but not ffn_dim 4864 or vocab 32000
    assert {lay.tp for lay in enumerate_layouts(REQUESTS["params3e9-gpus14"])} == {1, 2}


