"""MFU's peak: the data-sheet table is matched on the exact GPU model and form factor (CUDA device
names patched in; no GPU needed). A substring match once gave an L40 the L4's peak and an H100 PCIe
or NVL the SXM's."""

from __future__ import annotations

import pytest
import torch

from kubellm.training.metrics import peak_tflops


@pytest.fixture
def cuda_named(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    def set_name(name: str) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)

    return set_name


@pytest.mark.parametrize(("name", "peak"), [
    # what torch.cuda.get_device_name() reports, and the dense bf16 tensor peak of that card
    ("NVIDIA H100 80GB HBM3", 989.4),   # SXM5
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40", 181.0),
    ("NVIDIA L40S", 362.0),
    ("Tesla V100-SXM2-16GB", 125.0),
    ("Tesla V100-PCIE-32GB", 112.0),
    ("Tesla T4", 65.0),
])
def test_known_gpus_get_their_own_data_sheet_peak(cuda_named, name: str, peak: float) -> None:  # noqa: ANN001
    cuda_named(name)
    assert peak_tflops("cuda", None) == (peak, f"data sheet peak of {name}")


@pytest.mark.parametrize("name", [
    "NVIDIA H100 80GB HBM3 MIG 1g.10gb",  # a slice of an H100 has a fraction of its peak
    "NVIDIA H200 NVL",                    # a form factor not in the table is not the SXM
    "NVIDIA GH200 480GB",                 # contains "H200" but is another product
    "NVIDIA L40G",                        # contains "L40" and "L4"
    "NVIDIA A10G",
    "NVIDIA GeForce RTX 4090",
])
def test_unknown_gpus_get_no_peak_rather_than_a_guess(cuda_named, name: str) -> None:  # noqa: ANN001
    cuda_named(name)
    assert peak_tflops("cuda", None) == (None, f"unknown GPU {name}: set train.peak_tflops")


def test_a_configured_peak_wins_over_the_table(cuda_named) -> None:  # noqa: ANN001
    cuda_named("NVIDIA H100 PCIe")
    assert peak_tflops("cuda", 500.0) == (500.0, "train.peak_tflops")


@pytest.mark.parametrize("raw", ["abc", "-5", "0", "nan", "inf"])
def test_a_bad_env_peak_is_refused_naming_the_variable(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # it had become float(raw): 'abc' a bare ValueError after the model loaded, -5 a negative MFU, 0 no MFU
    from kubellm.core.errors import ConfigError
    from kubellm.model.config import get_preset
    from kubellm.training.config import LaunchConfig, ParallelConfig, TrainConfig
    from kubellm.training.job import check_before_launch

    monkeypatch.setenv("KUBELLM_PEAK_TFLOPS", raw)
    with pytest.raises(ConfigError, match=r"\$KUBELLM_PEAK_TFLOPS=.*expected the peak TFLOP/s per device"):
        peak_tflops("cpu", None)
    with pytest.raises(ConfigError, match=r"\$KUBELLM_PEAK_TFLOPS"):  # before any worker starts
        check_before_launch("pretrain", get_preset("debug"), TrainConfig(seq_len=32), ParallelConfig(), LaunchConfig())
    monkeypatch.setenv("KUBELLM_PEAK_TFLOPS", " 12.5 ")
    assert peak_tflops("cpu", None) == (12.5, "$KUBELLM_PEAK_TFLOPS")
