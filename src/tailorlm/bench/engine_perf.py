"""The engine benchmark behind ``tailorlm perf engine``: the engine side by side with the bare base model
and with stock PEFT, in one process on this machine.

How it keeps the comparison honest:

- every comparison runs its contenders on the same rows (same token ids, same padding, same position
  ids), interleaved A, B, C, A, B, C, ... after a warm-up round, and reports medians: the machine is
  shared, and interleaving spreads a slow spell over every contender instead of landing on one;
- one torch thread setting for the whole run (``settings.apply_threads``);
- forward passes are compared as full forward passes: every position's hidden state and the vocabulary
  projection at every position (what ``Engine.logits`` does; the bare model and PEFT return the same
  ``.logits``), with the KV cache off;
- the bare base model is a separately loaded, unwrapped copy of the same base;
- the PEFT contender holds exactly the batch's users' modules, written by ``module_folder.save_module``
  and read by ``PeftModel.from_pretrained`` / ``load_adapter``; the engine reloads the same files, so
  both hold the same numbers and their logits are cross-checked.

Every figure is measured when the benchmark runs; nothing here is a stored result.
"""

from __future__ import annotations

import gc
import math
import os
import random
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from tailorlm import kinds, models, settings
from tailorlm.engine.engine import Batch, Engine, Row, position_ids
from tailorlm.kinds import ModuleSpec
from tailorlm.kinds.bottleneck import BottleneckSpec
from tailorlm.kinds.ia3 import IA3Spec
from tailorlm.kinds.lora import LoraSpec
from tailorlm.kinds.prompt import PromptSpec
from tailorlm.store import module_folder
from tailorlm.train.trainer import MultiUserTrainer, TrainConfig, UserData

TINY = "tiny"
SECTIONS = ("lora", "decode", "ia3", "prompt", "bottleneck", "train", "load", "bytes")

ENGINE = "tailorlm engine"
BARE = "bare base model"
PEFT_MIXED = "PEFT adapter_names"
ENGINE_TRAIN = "engine, 8 users per step"
PEFT_TRAIN = "stock PEFT, one user after another"

LORA_QV = LoraSpec(rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
MIXED_SPECS: dict[str, ModuleSpec] = {
    "lora": LORA_QV,
    "ia3": IA3Spec(),
    "prompt": PromptSpec(virtual_tokens=16),
    "bottleneck": BottleneckSpec(placement="houlsby", reduction_factor=16),
}
AT_REST_SPECS: dict[str, ModuleSpec] = {
    "LoRA r8 q,v": LORA_QV,
    "LoRA r8 q,k,v,o": LoraSpec(rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    "IA3 k,v,down": MIXED_SPECS["ia3"],
    "prompt tuning 16 tokens": MIXED_SPECS["prompt"],
    "bottleneck Houlsby rf16": MIXED_SPECS["bottleneck"],
}

# The targets. "Flat" load time is not given a number there; 1.25x leaves room for this shared
# machine's noise while still catching a store that scans its folder or grows an index per module.
TARGET_VS_BASE = {"lora": 0.9, "ia3": 0.85, "prompt": 0.85, "bottleneck": 0.85}
TARGET_VS_PEFT = 1.5
TARGET_TRAIN = 2.0
TARGET_LOAD_VS_RAW = 3.0
TARGET_LOAD_FLAT = 1.25
TARGET_LORA_BYTES = 1_000_000  # 1 MB read as 10^6 bytes, the stricter reading

_TEXT = (
    "the bus was late again this morning and the driver did not stop at my corner so I walked to work in "
    "the rain my coffee tasted burnt but the new bakery near the station sells a lovely rye bread the "
    "film last night was slow in the middle yet the ending surprised everyone in our row I would not "
    "recommend the hotel because the room smelled of smoke and the staff ignored our complaints the "
    "museum guide knew every painting by heart and made the old masters feel alive my daughter loved "
    "the science show while my son fell asleep before the second experiment started"
)
_WORDS = _TEXT.split()


@dataclass(frozen=True)
class PerfConfig:
    """What to measure and how often. ``model`` is a base model name, or ``"tiny"`` for a smoke run."""

    model: str | None = None
    resident: int = 1000
    users_per_batch: int = 8
    repeats: int = 5
    warmup: int = 1
    tokens: int = 128  # prompt length of the longest row of a mixed batch
    decode_tokens: int = 32  # new tokens per row in the generation comparison
    train_examples: int = 8  # per user
    train_batch: int = 4  # rows of one user per step
    train_repeats: int = 3
    load_samples: int = 200
    stores: tuple[int, ...] = (10, 1000)
    bank_budget_bytes: int = 2 * 1024**3  # fp32 bank memory per kind; sets the resident count of big kinds
    seed: int = 0


@dataclass
class Timing:
    """One contender's wall-clock seconds per run; ``items`` is how many examples a run processes."""

    name: str
    seconds: list[float]
    resident: int | None = None
    items: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float | None:
        return self.items / self.median if self.items else None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "median_s": self.median,
            "min_s": min(self.seconds),
            "max_s": max(self.seconds),
            "runs": len(self.seconds),
            "seconds": self.seconds,
            "resident": self.resident,
            "items": self.items,
            "per_second": self.rate,
        }


@dataclass
class Check:
    """A measured figure against its target. For time ratios ``numerator`` and ``denominator`` name the
    timings whose medians give ``value``."""

    label: str
    value: float
    target: float
    higher_is_better: bool = True
    numerator: str | None = None
    denominator: str | None = None
    unit: str = "x"

    @property
    def passed(self) -> bool:
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "value": self.value,
            "target": self.target,
            "direction": ">=" if self.higher_is_better else "<=",
            "passed": self.passed,
            "numerator": self.numerator,
            "denominator": self.denominator,
            "unit": self.unit,
        }


@dataclass
class Section:
    name: str
    title: str
    timings: list[Timing] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    def timing(self, name: str) -> Timing:
        return next(t for t in self.timings if t.name == name)

    def ratio(
        self, label: str, numerator: str, denominator: str, target: float, higher_is_better: bool = True
    ) -> Check:
        """Add the check ``median(numerator) / median(denominator)`` against ``target``."""
        value = self.timing(numerator).median / self.timing(denominator).median
        check = Check(label, value, target, higher_is_better, numerator, denominator)
        self.checks.append(check)
        return check

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "timings": [t.to_dict() for t in self.timings],
            "checks": [c.to_dict() for c in self.checks],
            "notes": self.notes,
            "facts": self.facts,
        }


class Bench:
    """Shared state of one benchmark run: the config, the bare base model, fresh bases for engines."""

    def __init__(self, config: PerfConfig, log: Callable[[str], None] | None = None) -> None:
        if config.resident < config.users_per_batch:
            raise ValueError(
                f"--resident ({config.resident}) must be at least --users-per-batch "
                f"({config.users_per_batch}): a mixed batch holds distinct resident users"
            )
        self.config = config
        self.log = log or (lambda _message: None)
        self._tokenizer = models.load_tokenizer() if self.is_tiny else None
        self._bare: models.BaseModel | None = None

    @property
    def is_tiny(self) -> bool:
        return (self.config.model or "").lower() == TINY

    def fresh_base(self) -> models.BaseModel:
        """A newly loaded base: an engine or a PEFT model wraps its base in place, so each gets its own."""
        if self.is_tiny:
            return models.tiny_model(seed=0, tokenizer=self._tokenizer)
        return models.load_base(self.config.model)

    @property
    def bare(self) -> models.BaseModel:
        if self._bare is None:
            self._bare = self.fresh_base()
        return self._bare

    def resident_for(self, model: torch.nn.Module, spec: ModuleSpec) -> int:
        """The requested resident count, capped so that the kind's fp32 bank fits the memory budget."""
        per_user = 4 * numbers_per_user(model, spec)
        fits = max(self.config.users_per_batch, self.config.bank_budget_bytes // per_user)
        return min(self.config.resident, fits)

    def interleaved(self, label: str, contenders: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
        """Seconds per run of each contender: warm-up rounds, then rounds of A, B, C, then B, C, A, ..."""
        for _ in range(self.config.warmup):
            for run in contenders.values():
                run()
        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        names = list(contenders)
        for round_index in range(self.config.repeats):
            # Each round starts with the next contender, so none always runs right after a given other.
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                seconds[name].append(_timed(contenders[name]))
            summary = ", ".join(f"{n} {s[-1]:.3f}s" for n, s in seconds.items())
            self.log(f"{label}: round {round_index + 1}/{self.config.repeats}: {summary}")
        return seconds


def _timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


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


def training_users(tokenizer, users: int, examples: int, seed: int) -> list[UserData]:
    """Short rating-style examples (about 50 tokens each with the chat template), distinct per user."""
    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high)))

    data = []
    for user in range(users):
        pairs = [
            (
                models.chat_prompt(tokenizer, f"Rate this review from 1 to 5: {words(10, 20)}"),
                f"{rng.randint(1, 5)} stars, {words(2, 5)}",
            )
            for _ in range(examples)
        ]
        data.append(UserData(f"user{user}", pairs))
    return data


def fill_bank(engine: Engine, generator: torch.Generator, scale: float = 0.02) -> None:
    """Distinct non-identity modules in every user slot. Zero LoRA B or unit IA3 scales would cost the same
    arithmetic, but random values make a row routed to the wrong slot visible in the PEFT cross-check."""
    with torch.no_grad():
        for tensor in engine.bank.tensors.values():
            users = tensor.data[1:]
            users.add_(torch.randn(users.shape, generator=generator), alpha=scale)


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---- sections ------------------------------------------------------------------------------------------


@dataclass
class _MixedSetup:
    """A filled bank, the batch of distinct users, and (LoRA) the PEFT model holding the same modules."""

    engine: Engine
    resident: int
    users: list[int]
    batch: Batch
    peft_model: object | None
    adapter_names: list[str]

    @property
    def inputs(self) -> dict:
        return {
            "input_ids": self.batch.input_ids,
            "attention_mask": self.batch.attention_mask,
            "position_ids": position_ids(self.batch.attention_mask),
            "use_cache": False,
        }


def _mixed_setup(bench: Bench, spec: ModuleSpec, label: str) -> _MixedSetup:
    config = bench.config
    base = bench.fresh_base()
    resident = bench.resident_for(base.model, spec)
    bench.log(f"{label}: building a bank of {resident} resident users")
    engine = Engine(base, spec, slots=resident + 1, max_length=max(512, config.tokens + 8))
    fill_bank(engine, torch.Generator().manual_seed(config.seed))
    users = random.Random(config.seed).sample(range(1, resident + 1), config.users_per_batch)
    prompts = chat_prompts(bench.bare.tokenizer, config.tokens, config.users_per_batch, config.seed)
    batch = engine.encode([Row(prompt, "", slot) for prompt, slot in zip(prompts, users, strict=True)])
    peft_model, names = _peft_with_users(bench, engine, users) if isinstance(spec, LoraSpec) else (None, [])
    return _MixedSetup(engine, resident, users, batch, peft_model, names)


def _mixed_facts(setup: _MixedSetup, spec: ModuleSpec, bench: Bench) -> dict:
    return {
        "resident": setup.resident,
        "users": setup.users,
        "rows": len(setup.batch),
        "width": setup.batch.input_ids.shape[1],
        "real_tokens": int(setup.batch.attention_mask.sum()),
        "numbers_per_user": numbers_per_user(bench.bare.model, spec),
    }


def bench_mixed(bench: Bench, kind: str) -> Section:
    """A batch of ``users_per_batch`` distinct users out of the resident ones, through the engine, the bare
    base model and (LoRA) PEFT ``adapter_names``: one full forward pass each."""
    config = bench.config
    spec = MIXED_SPECS[kind]
    bare = bench.bare
    setup = _mixed_setup(bench, spec, kind)
    engine, batch, inputs, peft_model = setup.engine, setup.batch, setup.inputs, setup.peft_model
    contenders: dict[str, Callable[[], object]] = {
        ENGINE: lambda: engine.logits(batch),
        BARE: lambda: bare.model(**inputs).logits,
    }
    if peft_model is not None:
        contenders[PEFT_MIXED] = lambda: peft_model(**inputs, adapter_names=setup.adapter_names).logits
    section = Section(
        kind,
        f"Mixed batch, {spec.kind}: {config.users_per_batch} distinct users out of {setup.resident} resident",
        facts=_mixed_facts(setup, spec, bench),
    )
    with torch.inference_mode():
        if peft_model is not None:
            real = batch.attention_mask.bool()
            difference = (engine.logits(batch) - contenders[PEFT_MIXED]())[real].abs().max()
            section.facts["max_abs_logit_diff_vs_peft"] = float(difference)
        seconds = bench.interleaved(kind, contenders)
    section.timings = [
        Timing(ENGINE, seconds[ENGINE], resident=setup.resident),
        Timing(BARE, seconds[BARE], resident=0),
    ]
    section.ratio("engine speed vs bare base model", BARE, ENGINE, TARGET_VS_BASE[kind])
    if peft_model is not None:
        section.timings.append(Timing(PEFT_MIXED, seconds[PEFT_MIXED], resident=len(setup.users)))
        section.ratio("engine speed vs PEFT adapter_names", PEFT_MIXED, ENGINE, TARGET_VS_PEFT)
    section.notes.append(
        f"{len(batch)} rows, {section.facts['real_tokens']} real tokens, left padded to "
        f"{section.facts['width']}; full forward with logits at every position on every contender."
    )
    if isinstance(spec, PromptSpec):
        section.notes.append(
            f"the engine also runs each row's {spec.virtual_tokens} virtual tokens: that is the module's "
            "own cost, not overhead."
        )
    if setup.resident < config.resident:
        section.notes.append(
            f"{setup.resident} resident instead of {config.resident}: a {spec.kind} user is "
            f"{4 * section.facts['numbers_per_user'] / 1e6:.1f} MB in fp32 and the bank is capped at "
            f"{config.bank_budget_bytes / 2**30:.0f} GiB."
        )
    return section


def bench_decode(bench: Bench) -> Section:
    """The LoRA mixed batch again, but generating ``decode_tokens`` new tokens per row with the KV cache:
    the regime where each step is one token per row and per-layer overheads weigh most."""
    config = bench.config
    bare = bench.bare
    setup = _mixed_setup(bench, LORA_QV, "decode")
    engine, batch, peft_model = setup.engine, setup.batch, setup.peft_model
    tokenizer = bare.tokenizer
    # Exactly decode_tokens greedy tokens on every contender (no early stop at end of sequence), so each
    # does the same work; Engine.generate has no minimum length, so the engine's model runs under its
    # router here the way Engine.generate runs it.
    generate = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "max_new_tokens": config.decode_tokens,
        "min_new_tokens": config.decode_tokens,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }

    def engine_generate() -> torch.Tensor:
        with engine.router.route(batch.slot_ids):
            return engine.model.generate(**generate)

    contenders: dict[str, Callable[[], object]] = {
        ENGINE: engine_generate,
        BARE: lambda: bare.model.generate(**generate),
        PEFT_MIXED: lambda: peft_model.generate(**generate, adapter_names=setup.adapter_names),
    }
    section = Section(
        "decode",
        f"Mixed-batch generation, LoRA: {config.users_per_batch} distinct users out of {setup.resident} "
        f"resident, {config.decode_tokens} new tokens per row",
        facts=_mixed_facts(setup, LORA_QV, bench),
    )
    with torch.inference_mode():
        section.facts["same_tokens_as_peft"] = bool(torch.equal(engine_generate(), contenders[PEFT_MIXED]()))
        seconds = bench.interleaved("decode", contenders)
    section.timings = [
        Timing(ENGINE, seconds[ENGINE], resident=setup.resident),
        Timing(BARE, seconds[BARE], resident=0),
        Timing(PEFT_MIXED, seconds[PEFT_MIXED], resident=len(setup.users)),
    ]
    section.ratio("engine speed vs bare base model", BARE, ENGINE, TARGET_VS_BASE["lora"])
    section.ratio("engine speed vs PEFT adapter_names", PEFT_MIXED, ENGINE, TARGET_VS_PEFT)
    section.notes.append(
        f"greedy, KV cache on, exactly {config.decode_tokens} new tokens per row on every contender; "
        "the issue's mixed-batch targets applied to generation."
    )
    return section


def _peft_with_users(bench: Bench, engine: Engine, slots: Sequence[int]):
    """A PEFT model holding exactly ``slots``' LoRA modules, read from the files the engine writes; the
    engine reloads the same files so both hold the same (fp16-rounded) numbers."""
    from peft import PeftModel

    names = [f"user{slot}" for slot in slots]
    peft_model = None
    with tempfile.TemporaryDirectory(prefix="tailorlm-perf-") as root, warnings.catch_warnings():
        # transformers' deprecation notice raised inside PEFT's loader; nothing the benchmark can act on.
        warnings.simplefilter("ignore", FutureWarning)
        for slot, name in zip(slots, names, strict=True):
            folder = module_folder.save_module(engine, slot, Path(root) / name)
            engine.bank.write(slot, module_folder.read_for(engine.spec, folder).tensors)
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(
                    bench.fresh_base().model, str(folder), adapter_name=name
                )
            else:
                peft_model.load_adapter(str(folder), adapter_name=name)
    return peft_model.eval(), names


def bench_train(bench: Bench) -> Section:
    """The same examples through ``MultiUserTrainer`` (all users in every step) and through stock PEFT
    training one user after another, with the same mini-batches in the same order."""
    from peft import get_peft_model

    config = bench.config
    spec = LORA_QV
    users = training_users(bench.bare.tokenizer, config.users_per_batch, config.train_examples, config.seed)
    engine = Engine(bench.fresh_base(), spec, slots=len(users) + 1)
    train_config = TrainConfig(
        epochs=1,
        batch_size=config.train_batch,
        learning_rate=1e-4,
        users_per_step=len(users),
        seed=config.seed,
    )
    # The trainer's own plan, so PEFT gets the very batches the engine trains on.
    plans = {
        user.user_id: [indices for _, indices, _ in MultiUserTrainer(engine, train_config).batch_plan(user)]
        for user in users
    }
    peft_base = bench.fresh_base()
    placeholder = "placeholder"
    with warnings.catch_warnings():  # PEFT's advice about base_model_name_or_path; the base is right here
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            peft_base.model,
            kinds.of(spec).peft_config(spec, peft_base.model, peft_base.name),
            adapter_name=placeholder,
        )
    peft_model.train()
    losses: dict[str, list[float]] = {ENGINE_TRAIN: [], PEFT_TRAIN: []}

    def engine_run(subset: Sequence[UserData]) -> None:
        results = MultiUserTrainer(engine, train_config).run(subset)
        losses[ENGINE_TRAIN] = [loss for result in results for loss in result.train_losses]

    def peft_run(subset: Sequence[UserData], tag: str) -> None:
        step_losses = []
        for user in subset:
            name = f"{user.user_id}-{tag}"
            peft_model.add_adapter(name, kinds.of(spec).peft_config(spec, peft_base.model, peft_base.name))
            peft_model.set_adapter(name)
            params = [p for n, p in peft_model.named_parameters() if f".{name}." in n]
            for param in params:
                param.requires_grad_(True)
            optimizer = torch.optim.AdamW(
                params,
                lr=train_config.learning_rate,
                betas=train_config.betas,
                eps=train_config.eps,
                weight_decay=train_config.weight_decay,
            )
            for indices in plans[user.user_id]:
                batch = engine.encode([Row(*user.train[i]) for i in indices])
                output = peft_model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=position_ids(batch.attention_mask),
                    labels=batch.labels,
                    use_cache=False,
                )
                output.loss.backward()
                torch.nn.utils.clip_grad_norm_(params, train_config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_losses.append(float(output.loss.detach()))
            peft_model.set_adapter(placeholder)
            peft_model.delete_adapter(name)
        losses[PEFT_TRAIN] = step_losses

    bench.log("train: warm-up on one user each")
    engine_run(users[:1])
    peft_run(users[:1], "warmup")
    seconds: dict[str, list[float]] = {ENGINE_TRAIN: [], PEFT_TRAIN: []}
    for round_index in range(config.train_repeats):
        runs = [
            (ENGINE_TRAIN, lambda: engine_run(users)),
            (PEFT_TRAIN, lambda tag=f"r{round_index}": peft_run(users, tag)),
        ]
        for name, run in runs if round_index % 2 == 0 else reversed(runs):
            seconds[name].append(_timed(run))
        bench.log(
            f"train: round {round_index + 1}/{config.train_repeats}: "
            + ", ".join(f"{n} {s[-1]:.2f}s" for n, s in seconds.items())
        )
    examples = sum(len(u.train) for u in users) * train_config.epochs
    section = Section(
        "train",
        f"Training LoRA r8 q,v: {len(users)} users x {config.train_examples} examples, "
        f"batch {config.train_batch} per user",
        timings=[
            Timing(ENGINE_TRAIN, seconds[ENGINE_TRAIN], resident=len(users), items=examples),
            Timing(PEFT_TRAIN, seconds[PEFT_TRAIN], resident=1, items=examples),
        ],
    )
    section.ratio("examples/s vs stock PEFT one user at a time", PEFT_TRAIN, ENGINE_TRAIN, TARGET_TRAIN)
    # Positions each side runs through the model (padding included): a bigger batch pads every row to the
    # longest row of all users in the step, a one-user batch only to its own longest row.
    engine_steps = [
        engine.encode([Row(*user.train[i]) for user in users for i in plans[user.user_id][step]])
        for step in range(len(next(iter(plans.values()))))
    ]
    peft_steps = [
        engine.encode([Row(*u.train[i]) for i in chunk]) for u in users for chunk in plans[u.user_id]
    ]
    section.facts.update(
        {
            "examples": examples,
            "real_tokens": sum(int(b.attention_mask.sum()) for b in engine_steps),
            "padded_positions_engine": sum(b.input_ids.numel() for b in engine_steps),
            "padded_positions_peft": sum(b.input_ids.numel() for b in peft_steps),
            "steps_engine": len(next(iter(plans.values()))),
            "steps_peft": sum(len(p) for p in plans.values()),
            "mean_loss_engine": statistics.fmean(losses[ENGINE_TRAIN]),
            "mean_loss_peft": statistics.fmean(losses[PEFT_TRAIN]),
        }
    )
    section.notes.append(
        "same examples and mini-batches; the engine computes logits only where labels are, stock PEFT "
        "computes full logits (labels=); both clip gradients at 1.0 and use AdamW; adapter creation and "
        "deletion are inside PEFT's timed run, slot admission inside the engine's."
    )
    return section


def bench_load(bench: Bench) -> Section:
    """Cold load of one stored module into a slot (``module_folder.read_for``) vs reading its safetensors file
    with nothing else, from stores of different sizes."""
    config = bench.config
    base = bench.fresh_base()
    resident = bench.resident_for(base.model, LORA_QV)
    engine = Engine(base, LORA_QV, slots=resident + 1)
    fill_bank(engine, torch.Generator().manual_seed(config.seed))
    section = Section("load", f"Cold load of one LoRA r8 q,v module (fp16) into a slot of {resident}")
    rng = random.Random(config.seed)
    with tempfile.TemporaryDirectory(prefix="tailorlm-perf-") as root:
        stores: dict[int, Path] = {}
        for count in config.stores:
            bench.log(f"load: writing a store of {count} modules")
            folder = Path(root) / f"store-{count}"
            for index in range(count):
                module_folder.save_module(engine, 1 + index % resident, folder / f"user-{index:05d}")
            stores[count] = folder
            section.facts[f"store_{count}_bytes"] = sum(
                module_folder.module_bytes(f) for f in folder.iterdir()
            )
        seconds: dict[str, list[float]] = {}
        for sample in range(config.warmup + config.load_samples):
            for count, folder in stores.items():
                module = folder / f"user-{rng.randrange(count):05d}"
                slot = 1 + rng.randrange(resident)
                pair = [
                    (
                        f"load_module, {count} stored",
                        lambda m=module, s=slot: engine.bank.write(
                            s, module_folder.read_for(engine.spec, m).tensors
                        ),
                    ),
                    (
                        f"raw safetensors read, {count} stored",
                        lambda m=module: load_file(str(m / module_folder.WEIGHTS_FILE)),
                    ),
                ]
                # Alternate who goes first: the second reader of a file finds its metadata in CPU caches.
                for name, run in pair if sample % 2 == 0 else reversed(pair):
                    elapsed = _timed(run)
                    if sample >= config.warmup:
                        seconds.setdefault(name, []).append(elapsed)
        section.facts["module_file_bytes"] = (
            (next(iter(stores.values())) / "user-00000" / module_folder.WEIGHTS_FILE).stat().st_size
        )
    for count in config.stores:
        section.timings.append(
            Timing(f"load_module, {count} stored", seconds[f"load_module, {count} stored"], resident)
        )
        section.timings.append(
            Timing(f"raw safetensors read, {count} stored", seconds[f"raw safetensors read, {count} stored"])
        )
    for count in config.stores:
        section.ratio(
            f"load_module / raw read, {count} stored",
            f"load_module, {count} stored",
            f"raw safetensors read, {count} stored",
            TARGET_LOAD_VS_RAW,
            higher_is_better=False,
        )
    smallest, largest = min(config.stores), max(config.stores)
    if largest != smallest:
        section.ratio(
            f"load_module {largest} stored / {smallest} stored",
            f"load_module, {largest} stored",
            f"load_module, {smallest} stored",
            TARGET_LOAD_FLAT,
            higher_is_better=False,
        )
    section.notes.append(
        "files were just written, so both contenders read them from the OS page cache; a disk read would "
        "add the same device latency to both."
    )
    return section


def bench_bytes(bench: Bench, folder: str | Path | None = None) -> Section:
    """Bytes one user's module takes at rest (weights and configs), fp16 (the default) and fp32. Modules
    are written under ``folder`` when given (kept), else to a temporary folder."""
    section = Section("bytes", "Bytes per user at rest (weights + config files)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tailorlm-perf-") as scratch:
        root = Path(folder) if folder is not None else Path(scratch)
        for label, spec in AT_REST_SPECS.items():
            engine = Engine(bench.fresh_base(), spec, slots=2)
            engine.bank.reset(1, torch.Generator().manual_seed(bench.config.seed))
            slug = "".join(c if c.isalnum() else "-" for c in label)
            half = module_folder.save_module(engine, 1, root / slug / "float16")
            full = module_folder.save_module(engine, 1, root / slug / "float32", dtype="float32")
            row = {
                "module": label,
                "numbers": engine.bank.parameter_count(),
                "bytes_fp16": module_folder.module_bytes(half),
                "bytes_fp32": module_folder.module_bytes(full),
                "weights_bytes_fp16": (half / module_folder.WEIGHTS_FILE).stat().st_size,
            }
            if folder is not None:
                row.update({"folder_fp16": str(half), "folder_fp32": str(full)})
            rows.append(row)
            del engine  # one wrapped base at a time
            gc.collect()
    section.facts["modules"] = rows
    lora = next(r for r in rows if r["module"] == "LoRA r8 q,v")
    section.checks.append(
        Check(
            "LoRA r8 q,v bytes per user at rest (fp16)",
            lora["bytes_fp16"],
            TARGET_LORA_BYTES,
            False,
            unit="B",
        )
    )
    section.notes.append("1 MB = 1,000,000 bytes; fp16 is the default storage dtype.")
    return section


RUNNERS: dict[str, Callable[[Bench], Section]] = {
    "lora": lambda bench: bench_mixed(bench, "lora"),
    "decode": bench_decode,
    "ia3": lambda bench: bench_mixed(bench, "ia3"),
    "prompt": lambda bench: bench_mixed(bench, "prompt"),
    "bottleneck": lambda bench: bench_mixed(bench, "bottleneck"),
    "train": bench_train,
    "load": bench_load,
    "bytes": bench_bytes,
}


def parse_sections(values: Iterable[str] | None) -> list[str]:
    """``--only`` values (repeated and/or comma separated) in the benchmark's order; all when empty."""
    wanted = {part.strip().lower() for value in values or () for part in value.split(",") if part.strip()}
    unknown = wanted - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return [name for name in SECTIONS if name in wanted] if wanted else list(SECTIONS)


def run_benchmark(
    config: PerfConfig, sections: Sequence[str] = SECTIONS, log: Callable[[str], None] | None = None
) -> dict:
    """Run the chosen sections and return every figure as one JSON-ready payload."""
    threads = settings.apply_threads()
    bench = Bench(config, log)
    started = time.perf_counter()
    results = []
    for name in sections:
        bench.log(f"section {name}")
        section_started = time.perf_counter()
        # Other jobs share this machine: the load average says how much they competed during a section.
        load_before = os.getloadavg()[0]
        section = RUNNERS[name](bench)
        section.facts["load_average_1min"] = [load_before, os.getloadavg()[0]]
        section.facts["section_seconds"] = time.perf_counter() - section_started
        section.facts["rss_mb_after"] = _rss_mb()
        results.append(section)
        # The section's engines and models die with its frame; collect them before the next one loads.
        gc.collect()
    checks = [check for section in results for check in section.checks]
    return {
        "benchmark": "engine",
        "model": bench.bare.name,
        "threads": threads,
        "cores": settings.available_cores(),
        "torch": torch.__version__,
        "config": asdict(config),
        "sections": [section.to_dict() for section in results],
        "passed": sum(check.passed for check in checks),
        "missed": sum(not check.passed for check in checks),
        "peak_rss_mb": _peak_rss_mb(),
        "total_seconds": time.perf_counter() - started,
    }
