from __future__ import annotations

import pytest
from engine_helpers import SPECS

from tailorlm import models
from tailorlm.engine.engine import Engine


@pytest.fixture
def make_engine(tokenizer):
    """A fresh tiny base per engine: the engine wraps its base model in place."""

    def build(kind: str, slots: int = 5, **engine_options) -> Engine:
        return Engine(
            models.tiny_model(seed=0, tokenizer=tokenizer), SPECS[kind], slots=slots, **engine_options
        )

    return build
