"""The data_prep stage: `run(config, inputs, output) -> Manifest`."""

from __future__ import annotations

from collections.abc import Mapping

from kubellm.core.errors import NotImplementedStageError
from kubellm.core.manifest import Manifest


def run(config: object, inputs: Mapping[str, str], output: str) -> Manifest:
    raise NotImplementedStageError("the data_prep stage is not implemented yet")
