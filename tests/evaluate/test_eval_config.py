"""The evaluate section refuses what lm-eval would fail on later (or silently misread), naming the field:
dtype and device spellings, a chat task that is not evaluated, few-shot on the bundled tasks."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubellm.core.config import validate
from kubellm.core.errors import ConfigError
from kubellm.evaluate import harness, stage
from kubellm.evaluate.config import EvaluateConfig


def _cfg(**data: object) -> EvaluateConfig:
    return validate(EvaluateConfig, data, "run.yaml", prefix="evaluate")


@pytest.mark.parametrize(("data", "message"), [
    ({"dtype": "bf16"}, r"evaluate.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16' \(got 'bf16'\)"),
    ({"dtype": "fp32"}, r"evaluate.dtype: Input should be 'auto', 'float32'"),
    ({"device": "gpu"}, r"evaluate.device: .*'gpu' is not a device lm-eval takes: expected cpu, cuda, cuda:N or mps"),
    ({"device": "cuda:x"}, r"evaluate.device: .*'cuda:x' is not a device"),
    ({"chat_tasks": ["kubellm_fromat"]}, r"chat_tasks names \['kubellm_fromat'\], which is not in tasks"),
    ({"tasks": ["kubellm_knowledge"], "chat_tasks": ["kubellm_format"]},
     r"chat_tasks names \['kubellm_format'\], which is not in tasks \['kubellm_knowledge'\]"),
    ({"num_fewshot": 2}, r"num_fewshot 2: the bundled task\(s\) \['kubellm_knowledge', 'kubellm_format', "
                         r"'kubellm_preference'\] have no few-shot split"),
    ({"tasks": ["arc_easy", "kubellm_knowledge"], "num_fewshot": 5},
     r"num_fewshot 5: the bundled task\(s\) \['kubellm_knowledge'\] have no few-shot split"),
])
def test_bad_values_are_refused_naming_the_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(**data)


def test_good_values_and_defaults() -> None:
    for dtype in ("auto", "float32", "bfloat16", "float16"):
        assert _cfg(dtype=dtype).dtype == dtype
    for device in ("cpu", "cuda", "cuda:1", "mps", None):
        assert _cfg(device=device).device == device
    # the default chat tasks follow `tasks`; an explicit list inside `tasks` is kept as given
    assert _cfg(tasks=["kubellm_knowledge"]).chat_tasks == []
    assert _cfg(tasks=["kubellm_format", "arc_easy"]).chat_tasks == ["kubellm_format"]
    assert _cfg(tasks=["arc_easy", "kubellm_format"], chat_tasks=["arc_easy"]).chat_tasks == ["arc_easy"]
    assert _cfg().chat_tasks == ["kubellm_format", "kubellm_preference"]
    # a dumped section (what the pipelines pass) reads back the same
    c = _cfg(tasks=["kubellm_knowledge", "kubellm_format"])
    assert _cfg(**c.model_dump(mode="json")) == c
    # few-shot without the bundled tasks, and 0-shot with them, are fine
    assert _cfg(tasks=["arc_easy"], num_fewshot=5).num_fewshot == 5
    assert _cfg(num_fewshot=0).num_fewshot == 0


def test_a_device_this_machine_lacks_is_named_before_any_model_is_fetched(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"evaluate.device 'cuda': no CUDA device is visible here"):
        stage.run(_cfg(device="cuda", tasks=["kubellm_knowledge"]), {"models": str(tmp_path / "nosuch")},
                  str(tmp_path / "art"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"evaluate.device 'cuda:2': only 2 CUDA device\(s\) visible"):
        harness.check_device("cuda:2")
    harness.check_device("cuda:1")
