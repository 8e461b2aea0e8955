"""How fast does the engine train many users' modules at once, against stock PEFT training them one after
another, and how much of the machine's matmul speed does that use?

Two workloads, one section each: ``train`` (synthetic rating rows of about 50 tokens, the comparison
docs/engine.md has reported from the start) and ``train-task`` (real training rows of an offline task, verbagg
by default, prompted as the benchmark's per-user methods prompt them). Both sides train the same users
on the same mini-batches in the same order (the trainer's public ``batch_plan``), one epoch, learning
rate 1e-4, AdamW with the trainer's settings and its gradient clipping; no validation pass. When the
engine has its prefix-sharing switch, the engine runs with sharing on and off, so the gain is shown.

Useful FLOP/s = 4 x N x real tokens / seconds, with N the base's non-embedding parameters: per token a
forward pass costs 2N and the backward pass to the activations another 2N (the base is frozen, so there
are no weight gradients). Attention scores, the vocabulary projection, padding and the module's own terms
are not counted, and positions a shared prefix saves still count as work done: the figure is the work a
plain pass over the rows needs, per second, so it is comparable across contenders and with the GEMM peak.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from tailorlm import kinds
from tailorlm.engine.engine import Engine, Row
from tailorlm.kinds import ModuleSpec
from tailorlm.perf import gemm, workloads
from tailorlm.perf.contenders import PEFT_TRAIN, StockPeftTrainer, engine_train_name, prefix_switch
from tailorlm.perf.harness import Bench, FactTable, Section, Timing, rotation, timed
from tailorlm.train.trainer import MultiUserTrainer, TrainConfig, UserData

TARGET_TRAIN = 2.0  # the target: examples/s against stock PEFT one user at a time
LEARNING_RATE = 1e-4
FORMULA = (
    "useful FLOP = 4 x N x real tokens (forward 2N + backward to the activations 2N per token; the base is "
    "frozen: no weight gradients), N = non-embedding parameters of the base; attention scores, the "
    "vocabulary projection, padding and module terms not counted"
)


def train_kind() -> str:
    """The first registered kind stock PEFT can train (LoRA today): the comparison needs both sides."""
    return next(name for name, kind in kinds.MODEL_KINDS.items() if kind.peft_type is not None)


def non_embedding_parameters(model) -> int:
    """Parameters of the base outside its token embeddings and vocabulary projection (tied or not)."""
    skip = {id(model.get_input_embeddings().weight)}
    output = model.get_output_embeddings()
    if output is not None:
        skip.add(id(output.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def useful_flop(parameters: int, tokens: int) -> int:
    return 4 * parameters * tokens


def bench_train(bench: Bench) -> Section:
    config = bench.config
    users = workloads.training_users(
        bench.tokenizer, config.users_per_batch, config.train_examples, config.seed
    )
    return training_section(bench, "train", "synthetic rating rows", users, max_length=512)


def bench_train_task(bench: Bench) -> Section:
    config = bench.config
    users = workloads.task_users(
        bench.tokenizer, config.task, config.users_per_batch, config.train_examples, config.seed
    )
    return training_section(
        bench, "train-task", f"{config.task} training rows", users, max_length=config.task_max_length
    )


def _engines(bench: Bench, spec: ModuleSpec, users: int, max_length: int) -> dict[str, Engine]:
    """The engine contenders: with and without prefix sharing when the engine has the switch."""
    switch = prefix_switch()
    if switch is None:
        return {
            engine_train_name(users): Engine(bench.fresh_base(), spec, slots=users + 1, max_length=max_length)
        }
    return {
        engine_train_name(users, sharing): Engine(
            bench.fresh_base(), spec, slots=users + 1, max_length=max_length, **{switch: sharing}
        )
        for sharing in (True, False)
    }


def training_section(
    bench: Bench, name: str, workload: str, users: Sequence[UserData], max_length: int
) -> Section:
    config = bench.config
    kind = train_kind()
    spec = kinds.default_spec(kind)
    engines = _engines(bench, spec, len(users), max_length)
    first = next(iter(engines.values()))
    train_config = TrainConfig(
        epochs=1,
        batch_size=config.train_batch,
        learning_rate=LEARNING_RATE,
        users_per_step=len(users),
        seed=config.seed,
    )
    # The trainer's own plan, so PEFT gets the very mini-batches the engine trains on.
    planner = MultiUserTrainer(first, train_config)
    plans = {user.user_id: [indices for _, indices, _ in planner.batch_plan(user)] for user in users}
    peft = StockPeftTrainer(bench.fresh_base(), spec, train_config, first.encode)
    losses: dict[str, list[float]] = {}
    positions: dict[str, int] = {}
    tags = iter(range(1_000_000))  # PEFT adapter names must be new in every run

    def engine_run(label: str, engine: Engine, subset: Sequence[UserData]) -> None:
        before = getattr(engine, "positions_run", None)
        results = MultiUserTrainer(engine, train_config).run(subset)
        losses[label] = [loss for result in results for loss in result.train_losses]
        if before is not None:
            positions[label] = engine.positions_run - before

    def peft_run(subset: Sequence[UserData]) -> None:
        losses[PEFT_TRAIN] = peft.run(subset, plans, f"r{next(tags)}")

    runs: dict[str, Callable[[Sequence[UserData]], None]] = {
        label: (lambda subset, label=label, engine=engine: engine_run(label, engine, subset))
        for label, engine in engines.items()
    }
    runs[PEFT_TRAIN] = peft_run
    bench.log(f"{name}: warm-up on one user each")
    for run in runs.values():
        run(users[:1])
    seconds: dict[str, list[float]] = {label: [] for label in runs}
    for round_index in range(config.train_repeats):
        for label in rotation(list(runs), round_index):
            seconds[label].append(timed(lambda run=runs[label]: run(users)))
        bench.log(
            f"{name}: round {round_index + 1}/{config.train_repeats}: "
            + ", ".join(f"{label} {s[-1]:.2f}s" for label, s in seconds.items())
        )
    positions[PEFT_TRAIN] = sum(
        first.encode([Row(*user.train[i]) for i in chunk]).input_ids.numel()
        for user in users
        for chunk in plans[user.user_id]
    )
    examples = sum(len(u.train) for u in users) * train_config.epochs
    section = Section(
        name,
        f"Training {kind} ({workloads.settings_text(spec)}) on {workload}: {len(users)} users x "
        f"{config.train_examples} examples, batch {config.train_batch} per user, 1 epoch",
        timings=[
            Timing(label, seconds[label], resident=len(users) if label != PEFT_TRAIN else 1, items=examples)
            for label in runs
        ],
    )
    engine_label = next(iter(engines))
    section.ratio("examples/s vs stock PEFT one user at a time", PEFT_TRAIN, engine_label, TARGET_TRAIN)
    _flop_table(bench, section, first, users, positions)
    section.facts.update(
        {
            "spec": kinds.spec_to_dict(spec),
            "examples": examples,
            "steps_engine": len(next(iter(plans.values()))),
            "steps_peft": sum(len(p) for p in plans.values()),
            "positions_run": positions,
            "mean_loss": {label: statistics.fmean(values) for label, values in losses.items()},
        }
    )
    _sharing_notes(section, engines)
    section.notes.append(
        "same examples and mini-batches; the engine computes logits only where labels are, stock PEFT "
        "computes full logits (labels=); both use AdamW and clip gradients; adapter creation and deletion "
        "are inside PEFT's timed run, slot admission inside the engine's."
    )
    return section


def _flop_table(
    bench: Bench, section: Section, engine: Engine, users: Sequence[UserData], positions: dict[str, int]
) -> None:
    tokens = workloads.real_tokens(engine, list(users))
    parameters = non_embedding_parameters(bench.bare.model)
    flop = useful_flop(parameters, tokens)
    peak, peak_shape, peak_dtype = gemm.peak(bench)
    table = FactTable(
        f"useful FLOP/s against the best GEMM peak of this run ({peak_dtype})",
        [
            "contender",
            "examples/s",
            "real tokens/s",
            "useful GFLOP/s",
            "of GEMM peak",
            "positions run",
            "GFLOP/s run",
            "of GEMM peak",
        ],
    )
    useful, run = {}, {}
    for timing in section.timings:
        useful[timing.name] = flop / timing.median / 1e9
        ran = positions.get(timing.name)
        # What the decoder actually ran (padding included, shared prefixes once): the hardware's view.
        run[timing.name] = None if ran is None else useful_flop(parameters, ran) / timing.median / 1e9
        table.rows.append(
            [
                timing.name,
                timing.rate,
                tokens / timing.median,
                useful[timing.name],
                f"{useful[timing.name] / peak:.1%}",
                ran,
                run[timing.name],
                None if ran is None else f"{run[timing.name] / peak:.1%}",
            ]
        )
    section.tables.append(table)
    section.facts.update(
        {
            "real_tokens": tokens,
            "non_embedding_parameters": parameters,
            "useful_flop": flop,
            "useful_gflops": useful,
            "run_gflops": run,
            "gemm_peak_gflops": peak,
            "gemm_peak_dtype": peak_dtype,
            "fraction_of_gemm_peak": {name: value / peak for name, value in useful.items()},
        }
    )
    section.notes.append(
        f"{FORMULA}. Here N = {parameters:,}, {tokens:,} real tokens per epoch, "
        f"best GEMM peak {peak:.1f} GFLOP/s ({peak_dtype}, {peak_shape}). Useful FLOP/s counts positions "
        "a shared prefix saved as work done, so it can pass the peak; 'GFLOP/s run' is 4 x N x the "
        "positions the decoder ran (padding in, each shared prefix once): what the hardware did."
    )


def _sharing_notes(section: Section, engines: dict[str, Engine]) -> None:
    if len(engines) == 1:
        section.notes.append(
            "prefix sharing: the engine has no share_prefix switch, so only one engine contender runs "
            "(contenders.PREFIX_SWITCH)."
        )
        return
    shared, plain = engines
    gain = section.timing(plain).median / section.timing(shared).median
    versus_peft = section.timing(PEFT_TRAIN).median / section.timing(plain).median
    section.facts["prefix_sharing_gain"] = gain
    section.notes.append(
        f"prefix sharing: {gain:.2f}x the engine's speed without it (no target); without sharing the engine "
        f"is {versus_peft:.2f}x stock PEFT."
    )
