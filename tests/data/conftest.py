"""Fixtures shared by the data tests: a small demo world and its data-prep / tokenizer artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubellm.core.manifest import Manifest
from kubellm.data_prep import demo_world
from kubellm.data_prep.config import DataPrepConfig
from kubellm.data_prep.stage import run as data_prep
from kubellm.tokenizer.config import TokenizerConfig
from kubellm.tokenizer.stage import run as tokenize


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return demo_world.generate(tmp_path_factory.mktemp("demo"), seed=0, scale=0.06)


@pytest.fixture(scope="session")
def prepared(small_world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    out = tmp_path_factory.mktemp("artifacts")
    return data_prep(DataPrepConfig(validation_fraction=0.1), {"raw": str(small_world["corpus"])}, str(out))


@pytest.fixture(scope="session")
def tokenized(prepared: Manifest, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    out = tmp_path_factory.mktemp("tok")
    return tokenize(TokenizerConfig(vocab_size=512), {"dataset": prepared.uri}, str(out))
