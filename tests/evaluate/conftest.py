"""Fixtures for the evaluate tests (helpers live in evalkit.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from evalkit import build_export, publish_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def hf_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny exports sharing one tokenizer ("a": seed 0, "b": seed 1)."""
    root = tmp_path_factory.mktemp("hf")
    a = build_export(root / "a", seed=0)
    b = build_export(root / "b", seed=1, tokenizer_dir=a)
    return {"a": a, "b": b}


@pytest.fixture
def model_artifacts(hf_exports: dict[str, Path], tmp_path: Path) -> tuple[str, list]:
    """Two model artifacts (pretrain from "a", sft from "b") under a fresh local storage root."""
    root = str(tmp_path / "art")
    base = publish_model(hf_exports["a"], root, "pretrain", [[s, 6.0 - s / 10] for s in range(0, 30, 5)])
    sft = publish_model(hf_exports["b"], root, "sft", [[s, 3.0 - s / 20] for s in range(0, 20, 2)])
    return root, [base, sft]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny models are far faster on one thread than on two contended ones (shared 2-core CI)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
