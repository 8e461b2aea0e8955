"""Personalization methods: model setups (base, task adapter, per-user modules, OPPU), prompt recipes and
simple baselines, all answering in mixed-user batches through the engine."""
