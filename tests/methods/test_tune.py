from __future__ import annotations

import pytest

from tailorlm.bench.tune import tune
from tailorlm.data import load_task
from tailorlm.methods.context import BenchConfig, split_users

CONFIG = BenchConfig(model="tiny", test_users=4, users_per_step=2)


def test_tune_uses_validation_of_users_outside_the_test_sample():
    result = tune("verbagg", "peft-lora", [1e-3, 1e-2], users=2, epochs=1, config=CONFIG, progress=False)
    losses = {row["learning_rate"]: row["val_loss"] for row in result["candidates"]}
    assert result["best_learning_rate"] == min(losses, key=losses.get)
    test_users, _ = split_users(load_task("verbagg"), CONFIG)
    assert not set(result["users"]) & {u.id for u in test_users}
    assert len(result["users"]) == 2


def test_tune_refuses_methods_without_per_user_modules():
    with pytest.raises(ValueError, match="not a per-user module method"):
        tune("verbagg", "zero-shot", [1e-3], config=CONFIG, progress=False)
