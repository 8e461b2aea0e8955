"""A prompt's provenance names exactly what its text shows: the shots, the retrieved items, the profile,
the query and whether the query was blanked."""

from __future__ import annotations

from pathlib import Path

from tailorlm.data import load_task
from tailorlm.data.schema import User
from tailorlm.methods.profiles import UserProfile
from tailorlm.methods.recipes import PromptBuilder, Recipe
from tailorlm.methods.retrieval import BM25Retriever

FIXTURES = Path(__file__).parents[1] / "data" / "fixtures"


class FixedProfiles:
    """A profile source that needs no model: each user's profile names them and two of their items."""

    def ensure(self, users):
        return None

    def profile(self, user: User) -> UserProfile:
        items = tuple(item.id for item in user.history[:2])
        return UserProfile(user.id, f"PROFILE OF {user.id}", items)


def test_provenance_lists_what_the_text_shows(tokenizer):
    task = load_task("verbagg")
    user = next(u for u in task.users if u.test and len(task.training_examples(u)) > 3)
    example = user.test[0]
    recipe = Recipe(shots=True, retrieval="bm25", profile=True)
    builder = PromptBuilder(task, tokenizer, recipe, k=2, retriever=BM25Retriever(), profiles=FixedProfiles())
    prompt = builder.build(user, example)
    p = prompt.provenance
    assert (p.task, p.user, p.example, p.recipe, p.layout) == (
        "verbagg",
        user.id,
        example.id,
        recipe.tag,
        "blocks",
    )
    assert p.instruction and p.instruction in prompt.text
    assert len(p.retrieved) == 2 and 1 <= len(p.shots) <= 3
    by_id = {e.id: e for e in user.train} | {item.id: item for item in user.history}
    for shown in [*p.shots, *p.retrieved]:
        assert by_id[shown].text in prompt.text
    assert p.profile_of == user.id and f"PROFILE OF {user.id}" in prompt.text
    assert p.profile_items == tuple(item.id for item in user.history[:2])
    assert example.text in prompt.text and not p.content_free
    twin = builder.build(user, example, content_free=True).provenance
    assert twin.content_free and (twin.shots, twin.retrieved) == (p.shots, p.retrieved)


def test_a_plain_prompt_records_nothing_shown(tokenizer):
    task = load_task("lamp:2", data_dir=FIXTURES / "lamp" / "lamp2", split="dev")
    user = task.users[0]
    p = PromptBuilder(task, tokenizer, Recipe()).build(user, user.test[0]).provenance
    assert (p.shots, p.retrieved, p.profile_of, p.profile_items) == ((), (), None, ())
    assert p.layout == "lamp" and p.shown == frozenset()
