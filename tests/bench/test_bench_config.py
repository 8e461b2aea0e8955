"""The benchmark's config: its profiles, the settings it hands the methods, and its user split."""

from __future__ import annotations

import dataclasses

from tailorlm.bench.config import FULL, QUICK, BenchConfig, split_users
from tailorlm.data import load_task
from tailorlm.methods.deps import MethodSettings


def test_full_lifts_only_the_user_caps():
    assert (FULL.test_users, FULL.adapter_users, FULL.adapter_examples) == (None, None, None)
    assert dataclasses.replace(FULL, test_users=12, adapter_users=64, adapter_examples=256) == QUICK


def test_methods_get_the_configs_values_and_their_own_defaults_otherwise():
    # The quick profile and the methods' defaults agree, so a method run alone behaves as by default.
    assert QUICK.method_settings() == MethodSettings()
    config = BenchConfig(seed=4, k=5, epochs=1, adapter_examples=None, max_length=128)
    settings = config.method_settings()
    assert (settings.seed, settings.k, settings.epochs, settings.adapter_examples, settings.max_length) == (
        4,
        5,
        1,
        None,
        128,
    )
    assert settings.adapter_val_examples == MethodSettings().adapter_val_examples


def test_test_users_and_adapter_users_are_disjoint_and_seeded():
    task = load_task("verbagg")
    config = BenchConfig(test_users=5, adapter_users=7)
    test, adapter = split_users(task, config)
    assert len(test) == 5 and len(adapter) == 7
    assert not {u.id for u in test} & {u.id for u in adapter}
    assert all(u.test and task.training_examples(u) for u in test)
    assert split_users(task, config) == (test, adapter)
    other_seed = split_users(task, dataclasses.replace(config, seed=1))
    assert [u.id for u in other_seed[0]] != [u.id for u in test]
