"""What the benchmark feeds the contenders: synthetic chat prompts and training users, real task rows,
resident users with random modules (placed through ``SlotManager``), and the sizes that follow from a
kind's layout."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

import torch

from tailorlm import kinds, models
from tailorlm.data import load_task
from tailorlm.engine.engine import Engine, Row
from tailorlm.engine.slots import SlotManager
from tailorlm.kinds import ModuleSpec
from tailorlm.methods.recipes import PromptBuilder, Recipe
from tailorlm.perf.harness import PerfConfig
from tailorlm.train.trainer import UserData

_TEXT = (
    "the bus was late again this morning and the driver did not stop at my corner so I walked to work in "
    "the rain my coffee tasted burnt but the new bakery near the station sells a lovely rye bread the "
    "film last night was slow in the middle yet the ending surprised everyone in our row I would not "
    "recommend the hotel because the room smelled of smoke and the staff ignored our complaints the "
    "museum guide knew every painting by heart and made the old masters feel alive my daughter loved "
    "the science show while my son fell asleep before the second experiment started"
)
_WORDS = _TEXT.split()


# ---- specs ----------------------------------------------------------------------------------------------


def describe(spec: ModuleSpec) -> str:
    """A spec as a short label: its kind, plus every setting that differs from the kind's default
    (``lora``, ``lora targets=q_proj,k_proj,v_proj,o_proj``)."""
    values = kinds.spec_to_dict(spec)
    defaults = kinds.spec_to_dict(kinds.default_spec(values["kind"]))
    changed = [
        f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}"
        for key, value in values.items()
        if key != "kind" and value != defaults.get(key)
    ]
    return " ".join([values["kind"], *changed])


def settings_text(spec: ModuleSpec) -> str:
    """Every setting of a spec (``rank 8, alpha 16.0, dropout 0.0, targets q_proj,v_proj``), for titles."""
    values = kinds.spec_to_dict(spec)
    return ", ".join(
        f"{key} {','.join(map(str, value)) if isinstance(value, list) else value}"
        for key, value in values.items()
        if key != "kind"
    )


def numbers_per_user(model: torch.nn.Module, spec: ModuleSpec) -> int:
    """Trainable numbers one user's module has on ``model`` (without building a bank)."""
    kind = kinds.of(spec)
    targets = set(kind.targets(spec))
    shapes = list(kind.input_shapes(spec, model).values())
    for path, module in model.named_modules():
        short_name = path.rsplit(".", 1)[-1]
        if short_name in targets and isinstance(module, torch.nn.Linear):
            shapes += kind.linear_shapes(spec, short_name, module).values()
    return sum(math.prod(shape) for shape in shapes)


def resident_for(config: PerfConfig, model: torch.nn.Module, spec: ModuleSpec) -> int:
    """The requested resident count, capped so that the kind's fp32 bank fits the memory budget."""
    per_user = 4 * numbers_per_user(model, spec)
    fits = max(config.users_per_batch, config.bank_budget_bytes // per_user)
    return min(config.resident, fits)


# ---- resident users -------------------------------------------------------------------------------------


def random_module(
    template: Mapping[str, torch.Tensor], generator: torch.Generator, scale: float = 0.02
) -> dict[str, torch.Tensor]:
    """A distinct non-identity module: ``template`` (the identity) plus small noise. Zero LoRA B or unit
    IA3 scales would cost the same arithmetic, but random values make a row routed to the wrong slot
    visible in the PEFT cross-check."""
    return {
        name: value + scale * torch.randn(value.shape, generator=generator, dtype=value.dtype)
        for name, value in template.items()
    }


def place_random_users(manager: SlotManager, count: int, seed: int, prefix: str = "user") -> list[str]:
    """Fill ``count`` slots with users ``{prefix}0000``... holding random modules; returns their ids. The
    slot manager assigns the slots (it is the one owner of user <-> slot)."""
    if count > manager.capacity:
        raise ValueError(f"{count} users do not fit a bank of {manager.capacity} user slots")
    if manager.resident():
        raise ValueError("place_random_users fills an empty bank: its slot 1 is read as the identity")
    identity = manager.bank.read(1)
    generator = torch.Generator().manual_seed(seed)
    users = [f"{prefix}{index:04d}" for index in range(count)]
    for user in users:
        manager.place(user, random_module(identity, generator))
    return users


# ---- prompts and training rows --------------------------------------------------------------------------


def chat_prompts(tokenizer, tokens: int, count: int, seed: int) -> list[str]:
    """``count`` distinct chat-template prompts, the longest about ``tokens`` tokens and the shortest about
    three quarters of that, so the batch is left padded like real traffic."""
    overhead = len(tokenizer(models.chat_prompt(tokenizer, ""), add_special_tokens=False)["input_ids"])
    rng = random.Random(seed)
    prompts = []
    for index in range(count):
        want = tokens - round(index * tokens / (4 * max(1, count - 1)))
        text_tokens = max(4, want - overhead)
        words = " ".join(rng.choice(_WORDS) for _ in range(2 * text_tokens))
        ids = tokenizer(words, add_special_tokens=False)["input_ids"][:text_tokens]
        prompts.append(models.chat_prompt(tokenizer, tokenizer.decode(ids).strip()))
    return prompts


def training_users(tokenizer, users: int, examples: int, seed: int, words: int = 15) -> list[UserData]:
    """Synthetic rating-style examples, distinct per user. With the default ``words`` a row is about 50
    tokens with the chat template; ``words=300`` gives rows of about 400."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high)))

    data = []
    for user in range(users):
        pairs = [
            (
                models.chat_prompt(tokenizer, f"Rate this review from 1 to 5: {text(words * 2 // 3, words)}"),
                f"{rng.randint(1, 5)} stars, {text(2, 5)}",
            )
            for _ in range(examples)
        ]
        data.append(UserData(f"user{user}", pairs))
    return data


def task_users(tokenizer, task_name: str, users: int, examples: int, seed: int) -> list[UserData]:
    """Real training rows: ``users`` users of an offline task (seeded sample among those with at least
    ``examples`` training examples), each with their first ``examples`` training examples, prompted the way
    the benchmark's per-user methods train (``PromptBuilder`` under the plain ``Recipe``, the user message
    in the chat template, the example's target after it)."""
    task = load_task(task_name, seed=seed)
    builder = PromptBuilder(task, tokenizer, Recipe(), seed=seed)
    eligible = [u for u in task.users if len(task.training_examples(u)) >= examples]
    if len(eligible) < users:
        raise ValueError(
            f"task {task_name} has {len(eligible)} users with >= {examples} training examples; {users} wanted"
        )
    chosen = random.Random(seed).sample(eligible, users)
    return [
        UserData(
            user.id,
            [
                (models.chat_prompt(tokenizer, builder.text(user, example)), example.target)
                for example in task.training_examples(user)[:examples]
            ],
        )
        for user in chosen
    ]


def real_tokens(engine: Engine, users: list[UserData]) -> int:
    """Tokens of every training row (prompt + target + end of sequence, no padding), as the engine
    tokenizes them."""
    return sum(
        int(engine.encode([Row(prompt, target)]).attention_mask.sum())
        for user in users
        for prompt, target in user.train
    )
