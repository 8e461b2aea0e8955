"""Every method of the benchmark, as data: a model setup and a prompt recipe, or a simple baseline.

Families: ``simple-baseline``; ``non-personal`` (nothing about the user reaches the model);
``prompt-personal`` (the user's data in the prompt); ``parameter-personal`` (a module per user trained
from the bare base, PEFT-U); ``shared-personal`` (a shared model plus a tiny part per user: a label
bias, or the user's prior fused in); ``oppu`` (a module per user on top of the merged task adapter).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tailorlm.data.schema import Task, User
from tailorlm.methods import baselines, blend, collab, label_models, label_parts
from tailorlm.methods.decoding import UserAnswers
from tailorlm.methods.deps import MethodDeps
from tailorlm.methods.personal import PersonalSetup
from tailorlm.methods.recipes import Recipe
from tailorlm.methods.setups import (
    OPPU_PERSONAL,
    OPPU_SHRUNK,
    PERSONAL_KINDS,
    Answerer,
    BaseSetup,
    Setup,
    TaskAdapterSetup,
    answer_users,
)


@dataclass(frozen=True)
class Method:
    """A named method: a model setup with a prompt recipe, or (``setup`` None) a rule-based baseline."""

    name: str
    family: str
    description: str
    setup: Setup | None = None
    recipe: Recipe = field(default_factory=Recipe)
    personal: bool = True

    def prepare(self, deps: MethodDeps, users: Sequence[User]) -> Answerer:
        """The method ready to answer any example of ``users`` (their modules trained if it has any)."""
        if self.setup is None:
            raise ValueError(f"{self.name} is a rule-based baseline: it has no model to prepare")
        return self.setup.prepare(deps, self.name, self.recipe, users)

    def run(self, deps: MethodDeps, users: Sequence[User], decoding: str) -> Iterator[UserAnswers]:
        """Every test example of ``users``, a user at a time as their answers exist."""
        if self.setup is None:
            yield from baselines.applicable(deps.task)[self.name](deps.task, users)
        else:
            yield from answer_users(self.prepare(deps, users), users, decoding)


_BM25, _DENSE = Recipe(retrieval="bm25"), Recipe(retrieval="dense")
_PROFILE = Recipe(profile=True)

MODEL_METHODS: list[Method] = [
    Method(
        "zero-shot", "non-personal", "base model, instruction and query only", BaseSetup(), personal=False
    ),
    Method(
        "few-shot",
        "prompt-personal",
        "the user's own train examples in the prompt, at most one per label",
        BaseSetup(),
        Recipe(shots=True),
    ),
    Method(
        "rag-bm25", "prompt-personal", "top-k of the user's history by BM25 in the prompt", BaseSetup(), _BM25
    ),
    Method(
        "rag-dense",
        "prompt-personal",
        "top-k of the user's history by MiniLM similarity in the prompt",
        BaseSetup(),
        _DENSE,
    ),
    Method(
        "pag",
        "prompt-personal",
        "a profile of the user, written by the base model, in the prompt",
        BaseSetup(),
        _PROFILE,
    ),
    Method(
        "task-adapter",
        "non-personal",
        "OPPU stage 1: one LoRA trained on other users only",
        TaskAdapterSetup(),
        personal=False,
    ),
    Method(
        "task-adapter+rag",
        "prompt-personal",
        "the task adapter with BM25 retrieval (trained that way)",
        TaskAdapterSetup(),
        _BM25,
    ),
    Method(
        "task-adapter+pag",
        "prompt-personal",
        "the task adapter with the user's profile (trained that way)",
        TaskAdapterSetup(),
        _PROFILE,
    ),
    *[
        Method(
            f"peft-{kind}",
            "parameter-personal",
            f"a {kind} module per user trained on their own data (PEFT-U)",
            PersonalSetup(recipe),
        )
        for kind, recipe in PERSONAL_KINDS.items()
    ],
    Method(
        "oppu",
        "oppu",
        "task adapter merged, then a LoRA per user on their own data",
        PersonalSetup(OPPU_PERSONAL, on_task_adapter=True),
    ),
    Method(
        "oppu-shrink",
        "oppu",
        "OPPU with the personal LoRA pulled toward the task adapter by weight decay",
        PersonalSetup(OPPU_SHRUNK, on_task_adapter=True),
    ),
    Method(
        "oppu+rag",
        "oppu",
        "OPPU with BM25 retrieval, trained and asked that way",
        PersonalSetup(OPPU_PERSONAL, on_task_adapter=True),
        _BM25,
    ),
    Method(
        "oppu+pag",
        "oppu",
        "OPPU with the user's profile, trained and asked that way",
        PersonalSetup(OPPU_PERSONAL, on_task_adapter=True),
        _PROFILE,
    ),
]

# Shared model plus a tiny personal part, for tasks with one label per item (``label_parts.applies_to``).
LABEL_MODEL_METHODS: list[Method] = [
    Method(
        "task-adapter+bias",
        "shared-personal",
        "the task adapter plus a bias over the labels per user, fitted against it and shrunk toward zero",
        label_models.BiasSetup(),
    ),
    Method(
        "task-adapter+select",
        "shared-personal",
        "per user the best of their label prior, their bias and the task adapter fused with their prior, on "
        "their own validation items; each served as one label-bias module",
        label_models.BiasSetup(store="task-adapter+select", fit="select"),
    ),
    Method(
        "joint+bias",
        "shared-personal",
        "a shared LoRA trained to choose labels jointly with a shrunk bias per training user; each user "
        "fits only their own bias against it",
        label_models.BiasSetup(label_models.JointSharedSetup(), store="joint+bias"),
    ),
    Method(
        "fusion",
        "shared-personal",
        "the task adapter's label distribution times the user's and item's prior, weight tuned on validation",
        label_models.FusionSetup(),
    ),
    Method(
        "oppu-select",
        "oppu",
        "per user the best of their shrunk OPPU module, their bias and their prior on their validation items",
        label_models.SelectSetup(),
    ),
]

# The stacked blend, and the same blend without the model (the reference its model part has to beat), for
# label tasks whose items are shared between users (``blend``).
BLEND_METHODS: list[Method] = [
    Method(
        "blend",
        "shared-personal",
        "the user-item prior, damped biases and matrix factorisation stacked with the task adapter's label "
        "distribution, each weighed by how many training answers the item has (fitted on validation answers)",
        blend.BlendSetup(),
    ),
    Method(
        "blend-stats",
        "simple-baseline",
        "the same blend without the model: the prior, damped biases and matrix factorisation stacked",
        blend.BlendSetup(with_model=False),
    ),
    Method(
        "blend+rag",
        "shared-personal",
        "the stacked blend whose model reads the user's most similar training answers (BM25) before the "
        "item: the task adapter trained and asked with retrieval, a content-based personal signal beside "
        "the factorisation's",
        blend.BlendSetup(),
        _BM25,
    ),
]

# Collaborative tokens, alone and as the blend's model, for label tasks whose items are shared between
# users and whose labels are ordered (matrix factorisation reads label positions).
COLLAB_METHODS: list[Method] = [
    Method(
        "collab",
        "shared-personal",
        "the task adapter reading each user's matrix-factorisation vector (folded in from their answers) "
        "as soft tokens made by a shared MLP",
        collab.CollabSetup(),
    ),
    Method(
        "blend-collab",
        "shared-personal",
        "the stacked blend with the collaborative-token model as its model",
        blend.BlendSetup(model=collab.CollabSetup(), model_from="module"),
    ),
]

BASELINE_DESCRIPTIONS = {
    "user-majority": "the user's most frequent training label",
    "user-mean": "the user's mean training rating, rounded to the nearest label",
    "item-user-bias": "the item's mean over all users' training answers plus the user's mean deviation",
    "item-majority": "the label most users gave the item in training (non-personal)",
    "user-item-prior": "the user's label prior times the item's label prior over the global prior",
    "damped-biases": "global mean plus regularised user and item biases (Surprise BaselineOnly)",
    "matrix-factorisation": "biased matrix factorisation of users x items (Surprise SVD)",
    "nearest-output": "the output of the user's most similar earlier item (BM25)",
}

# The quick default: every family, sized for the 15-minute budget of `make demo`.
DEFAULT_METHODS = (
    "blend-stats",  # the strongest simple baseline where items are shared: in every default report
    "zero-shot",
    "few-shot",
    "rag-bm25",
    "pag",
    "task-adapter",
    "peft-lora",
    "peft-ia3",
    "peft-prompt",
    "peft-bottleneck",
    "oppu",
    "task-adapter+bias",  # label tasks only, like the next
    "fusion",
)


def methods_for(task: Task) -> dict[str, Method]:
    """Every method that applies to ``task``, by name."""
    found = {m.name: m for m in MODEL_METHODS}
    simple = baselines.applicable(task)
    if label_parts.applies_to(task):
        found.update({m.name: m for m in LABEL_MODEL_METHODS})
        if "user-item-prior" in simple:  # items shared between users: statistics to stack
            found.update({m.name: m for m in BLEND_METHODS})
            if task.ordinal:
                found.update({m.name: m for m in COLLAB_METHODS})
    for name in simple:
        found[name] = Method(
            name, "simple-baseline", BASELINE_DESCRIPTIONS[name], personal=name != "item-majority"
        )
    return found


def default_methods(task: Task) -> list[str]:
    available = methods_for(task)
    return [*baselines.applicable(task), *(name for name in DEFAULT_METHODS if name in available)]


def resolve(task: Task, requested: Sequence[str] | None) -> list[tuple[Method, str | None]]:
    """Names as typed (``name``, or ``name@DECODING`` with one of ``decoding.DECODINGS``) to methods and
    decoding overrides; ``all`` means every applicable method."""
    available = methods_for(task)
    names = default_methods(task) if not requested else list(requested)
    if names == ["all"]:
        names = list(available)
    chosen = []
    for entry in names:
        name, _, decoding = entry.partition("@")
        if name not in available:
            raise ValueError(
                f"unknown method {name!r} for task {task.name}; choose from {', '.join(available)}"
            )
        chosen.append((available[name], decoding or None))
    return chosen
