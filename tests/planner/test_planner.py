"""kubellm plan: memory formulas, layout rules, refusal with numbers, the 7B on 8×80 GB example."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from kubellm.core.errors import ConfigError
from kubellm.model.config import get_preset
from kubellm.training.planner import Request, model_state_bytes, plan, to_fragment


def test_zero_memory_formulas_match_the_paper() -> None:
    psi, dp = 7.5e9, 64  # the ZeRO paper's example: 7.5B params, Nd = 64, K = 12
    tot = lambda z: sum(model_state_bytes(psi, z, dp, "bf16")) / 1e9  # noqa: E731
    assert tot(0) == pytest.approx(120, rel=1e-3)
    assert tot(1) == pytest.approx(31.4, rel=1e-2)
    assert tot(2) == pytest.approx(16.6, rel=1e-2)
    assert tot(3) == pytest.approx(1.875, rel=1e-3)  # the paper rounds to 1.9


def test_7b_on_8x80gb_fits_and_respects_rules() -> None:
    req = Request(model=get_preset("7b"), gpus=8, gpu_mem_gb=80, seq_len=4096, global_batch=256)
    layouts = plan(req, top=50)
    assert layouts and all(lay.mem_total_gb <= 72 for lay in layouts)
    assert all(lay.dp * lay.tp * lay.pp == 8 for lay in layouts)
    assert not any(lay.pp > 1 and lay.zero > 1 for lay in layouts)  # DeepSpeed refuses ZeRO-2/3 with PP
    steps = [lay.step_s for lay in layouts]
    assert all(b >= a * 0.99 for a, b in zip(steps, steps[1:], strict=False))  # fastest first (1% buckets)
    # Plain DP with ZeRO-0 needs 16 bytes/param ≈ 105 GB for 7B: it must not be offered.
    assert not any(lay.tp == 1 and lay.pp == 1 and lay.zero == 0 for lay in layouts)
    frag = to_fragment(req, layouts[0])
    launch = frag["pretrain"]["launch"]
    assert (launch["backend"], launch["nproc_per_node"], launch["nnodes"], launch["gpu"]) == ("pytorchjob", 8, 1, 8)
    # the fragment is a valid run-config
    from kubellm.core.config import validate
    from kubellm.runconfig import RunConfig

    cfg = validate(RunConfig, {**frag, "pretrain": {**frag["pretrain"], "model": {"preset": "7b"}}})
    assert cfg.pretrain.parallel.dp == layouts[0].dp


def test_refuses_what_cannot_fit_with_numbers() -> None:
    req = Request(model=get_preset("7b"), gpus=1, gpu_mem_gb=16, seq_len=4096, global_batch=8)
    with pytest.raises(ConfigError, match=r"do not fit 1 × 16 GB: the smallest layout needs \d+\.\d GB"):
        plan(req)


def test_cli_writes_a_fragment(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "plan.yaml"
    r = subprocess.run([sys.executable, "-m", "kubellm.cli", "plan", "--model", "7b", "--gpus", "8",
                        "--gpu-mem-gb", "80", "--seq-len", "4096", "--output", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    frag = yaml.safe_load(out.read_text())
    p = frag["pretrain"]["parallel"]
    assert p["dp"] * p["tp"] * p["pp"] == 8
    r = subprocess.run([sys.executable, "-m", "kubellm.cli", "plan", "--model", "7b", "--gpus", "1",
                        "--gpu-mem-gb", "8"], capture_output=True, text=True)
    assert r.returncode == 1 and "do not fit" in r.stderr and "Traceback" not in r.stderr
