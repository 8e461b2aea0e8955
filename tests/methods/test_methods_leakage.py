"""The visibility rules, proven on the data path of real runs (tiny model, small sample):

- no method ever shows or trains on a test user's test items (except asking the item itself);
- the task adapter never sees a test user at all;
- no user's module sees another user's data.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from tailorlm.bench import runner
from tailorlm.methods import recipes, setups
from tailorlm.methods.context import BenchConfig
from tailorlm.train.trainer import UserData

SMALL = BenchConfig(
    model="tiny",
    test_users=3,
    adapter_users=4,
    adapter_examples=24,
    epochs=1,
    max_new_tokens=4,
    users_per_step=2,
    profile_items=4,
)


@pytest.fixture
def spy(monkeypatch):
    """Records which (user, example, shots, retrieved) built each prompt, and every training job."""
    built: dict[str, list[dict]] = defaultdict(list)
    jobs: list[tuple[str, list[UserData]]] = []
    phase = ["answering"]  # what the builder is being called for right now
    original_text = recipes.PromptBuilder.text
    original_pairs = recipes.PromptBuilder.pairs
    original_adapter = setups.TaskAdapterSetup.ensure_trained

    def in_phase(name, call):
        previous, phase[0] = phase[0], name
        try:
            return call()
        finally:
            phase[0] = previous

    def recording_pairs(self, user, examples):
        return in_phase(f"personal:{user.id}", lambda: original_pairs(self, user, examples))

    def recording_adapter(self, ctx, recipe):
        return in_phase("adapter", lambda: original_adapter(self, ctx, recipe))

    def recording_text(self, user, example, content_free=False):
        shots = recipes.few_shot(self.task, user, example, seed=self.seed) if self.recipe.shots else []
        retrieved = []
        if self.recipe.retrieval:
            from tailorlm.data import render

            retrieved = self.retriever.top_k(
                render.query(self.task, example), self.task.history_for(user, example), self.k
            )
        text = original_text(self, user, example, content_free)
        built[text].append(
            {
                "user": user.id,
                "example": example.id,
                "shots": [s.id for s in shots],
                "retrieved": [r.id for r in retrieved],
                "phase": phase[0],
            }
        )
        return text

    original_job = setups.train_job

    def recording_job(engine, users, config, store, on_progress=None):
        jobs.append((str(store.root), list(users)))
        return original_job(engine, users, config, store, on_progress)

    monkeypatch.setattr(recipes.PromptBuilder, "text", recording_text)
    monkeypatch.setattr(recipes.PromptBuilder, "pairs", recording_pairs)
    monkeypatch.setattr(setups.TaskAdapterSetup, "ensure_trained", recording_adapter)
    monkeypatch.setattr(setups, "train_job", recording_job)
    return built, jobs


def _plain_text(prompt: str) -> str:
    # The builder's text sits inside the chat template; recover it to look the provenance up.
    start = prompt.index("<|im_start|>user\n") + len("<|im_start|>user\n")
    return prompt[start : prompt.index("<|im_end|>", start)]


def test_no_method_leaks_test_items_or_other_users(spy, tmp_path):
    built, jobs = spy
    methods = ["few-shot", "rag-bm25@calibrated", "task-adapter+rag", "peft-lora", "oppu+rag"]
    runner.run("verbagg", tmp_path, methods, SMALL)
    from tailorlm.data import load_task
    from tailorlm.methods.context import split_users

    task = load_task("verbagg", seed=SMALL.seed)
    test_users, adapter_users = split_users(task, SMALL)
    test_ids = {u.id for u in test_users}
    held_out = {u.id: {e.id for e in [*u.val, *u.test]} for u in task.users}
    own_items = {u.id: {e.id for e in u.examples()} for u in task.users}
    test_items = {u.id: {e.id for e in u.test} for u in task.users}

    # Prompts: shots and retrieved items are the asking user's own, and never one of their held-out items.
    for records in built.values():
        for record in records:
            shown = set(record["shots"]) | set(record["retrieved"])
            assert shown <= own_items[record["user"]], record
            assert not shown & held_out[record["user"]], record
            assert record["example"] not in shown

    assert {folder.rsplit("/", 1)[-1] for folder, _ in jobs} >= {"task-adapter-bm25", "peft-lora", "oppu+rag"}
    for folder, users in jobs:
        for job in users:
            expected_phase = "adapter" if job.user_id == "task" else f"personal:{job.user_id}"
            for prompt, _target in [*job.train, *job.val]:
                sources = [s for s in built[_plain_text(prompt)] if s["phase"] == expected_phase]
                assert sources, f"{folder}: a training prompt that was not built for {expected_phase}"
    for records in built.values():
        for record in records:
            if record["phase"] == "adapter":
                # The task adapter: built only from users outside the test sample.
                assert record["user"] not in test_ids, record
            elif record["phase"].startswith("personal:"):
                # A personal module: only its own user's examples (train, and val for choosing the best
                # epoch), never their test items.
                assert record["user"] == record["phase"].removeprefix("personal:"), record
                assert record["example"] not in test_items[record["user"]], record
    for _folder, users in jobs:
        for job in users:
            if job.user_id != "task":
                assert job.user_id in test_ids
    assert len(adapter_users) == SMALL.adapter_users and not {u.id for u in adapter_users} & test_ids

    # Every test user got one prediction per test item from every method.
    for method in methods:
        lines = [
            json.loads(x) for x in (tmp_path / "predictions" / f"{method}.jsonl").read_text().splitlines()
        ]
        assert {line["user"] for line in lines} == test_ids
        for line in lines:
            assert [e["id"] for e in line["examples"]] == [e.id for e in task.user(line["user"]).test]
