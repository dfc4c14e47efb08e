"""`generate` validates `max_new_tokens` itself (it was only checked by the CLI): a negative or
non-integer count is a `ConfigError` naming it, 0 generates nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kubellm.cli import main as cli_main
from kubellm.core.errors import ConfigError
from kubellm.model import Transformer
from kubellm.model.config import ModelConfig
from kubellm.model.generate import generate

CFG = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, ffn_dim=32, max_seq_len=24)


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


@pytest.mark.parametrize("n", [-1, -3, -30, 2.5, True, "4"])
def test_bad_max_new_tokens_is_a_config_error_naming_it(n: object) -> None:
    # -1 gave [[]] silently, -3 a KV-cache error about max_len, -30 an error about the prompt
    with pytest.raises(ConfigError, match=rf"^{re.escape(f'max_new_tokens={n!r}')}: expected an integer >= 0$"):
        generate(_model(), [1, 2, 3], max_new_tokens=n)  # type: ignore[arg-type]


def test_zero_and_positive_max_new_tokens() -> None:
    m = _model()
    assert generate(m, [1, 2, 3], max_new_tokens=0) == [[]]
    assert generate(m, [[1, 2, 3], [4, 5, 6]], max_new_tokens=0) == [[], []]
    assert len(generate(m, [1, 2, 3], max_new_tokens=4)[0]) == 4


def test_cli_refuses_negative_max_new_tokens_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the CLI uses generate's check, naming the flag, and fails before it looks at the model
    assert cli_main(["generate", "--model", str(tmp_path / "absent"), "--prompt", "x",
                     "--max-new-tokens", "-3"]) == 1
    err = capsys.readouterr().err
    assert "--max-new-tokens=-3: expected an integer >= 0" in err and "absent" not in err
