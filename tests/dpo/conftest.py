from __future__ import annotations

from pathlib import Path

import pytest

from tests.sft.chatkit import build_project_tokenizer


@pytest.fixture(scope="session")
def project_tok(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_project_tokenizer(Path(tmp_path_factory.mktemp("tok"))))
