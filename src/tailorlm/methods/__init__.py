"""Personalization methods: model setups (base, task adapter, per-user modules, OPPU), prompt recipes with
provenance, and simple baselines, all answering in mixed-user batches through the engine. A method takes
what it needs explicitly (``deps.MethodDeps``) and imports nothing of the benchmark, so one user's
question can be asked outside any benchmark run."""
