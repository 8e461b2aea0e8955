"""How long a benchmark run will take, said before it starts, and the caps that fit a quick run into a
time budget whatever the task.

The estimate times the calls the methods themselves make, on a small pilot of the run's own users, on
this machine with this base model (``measure``, a few seconds on a short-prompt task):

- answering: ``setups.answer_examples`` with each method's own prompt builder (its shots, retrieved items
  or profile) and decoding, so label scoring with all the task's labels and generation up to its real
  stopping point are what is timed; the label-model methods' ``label_parts.shared_distribution``, which
  scores a user at a time;
- training: ``MultiUserTrainer`` steps on a user's real rows as each method builds them (several users
  per step for a per-user module, pooled rows for the task adapter), and its validation loss;
- PAG profiles written by the profile writer; and loading a base model into an engine.

Each method's work is then counted from the run's users in those units (``method_seconds``); shared parts
(the task adapter, profiles, a module store two methods use) count once, in the first method that needs
them, as the run trains them there.

When the estimate is over the budget, the run is capped, in this order (``fit_budget``): the number of
test users (down to ``MIN_TEST_USERS``); then each test user's training items (a seeded sample, the same
for every method, baselines included, so methods stay comparable); then the task adapter's examples. A cut
of the users' items handicaps exactly the personal methods the benchmark compares, so it comes last among
the users' cuts and the report says so in every row it touches. A run still over the budget fully capped
(a LaMP-5 file of long abstracts: a training row is about a second here) leaves out the costliest methods
of a family it keeps another method of, say the per-user kinds beyond the first, and says which. The caps
go into the run's config, so the report shows them and a resumed run keeps them.
"""

from __future__ import annotations

import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from tailorlm.bench.config import BenchConfig, split_users
from tailorlm.data.schema import Example, Task, User
from tailorlm.engine.batch import Row
from tailorlm.engine.engine import Engine
from tailorlm.methods import blend, collab, label_models, label_parts
from tailorlm.methods.deps import MethodDeps
from tailorlm.methods.personal import PersonalSetup
from tailorlm.methods.profiles import Profiles
from tailorlm.methods.recipes import Recipe
from tailorlm.methods.registry import Method
from tailorlm.methods.setups import (
    OPPU_PERSONAL,
    TASK_ADAPTER,
    Answerer,
    BaseSetup,
    TaskAdapterSetup,
    answer_examples,
    personal_job,
    training_job,
)
from tailorlm.train.trainer import MultiUserTrainer, TrainConfig, pass_ranges, planned_passes

# The fewest test users a capped run keeps (below this the confidence intervals say little); the caps
# tried on each test user's training items once the users are down to that, loosest first; and the caps
# on the task adapter's examples tried last.
MIN_TEST_USERS = 8
USER_ITEM_CAPS = (128, 96, 64, 48, 32, 24, 16, 12, 8)
ADAPTER_EXAMPLE_CAPS = (128, 64)
# The pilot: users whose profiles the task adapter's timed step reads; users of a full training pass of
# personal modules (4 users x 4 rows, a micro-batch; one user's step is timed too); answers timed per recipe
# (half a batch of ``decoding.answer`` when scoring labels, whose cost per item hardly depends on the batch;
# a full batch when generating, whose steps cost about the same for 8 rows as for 16); and profiles
# written (a full batch of the writer, for the same reason). Smaller pilots keep measuring short, which
# the run's budget pays for.
PILOT_USERS = 2
PILOT_PASS_USERS = 4
PILOT_ANSWERS = 8
PILOT_GENERATIONS = 16
PILOT_PROFILES = 8

PlanEntry = tuple[str, Method, str]  # (the run's key for the method, the method, its decoding)


@dataclass(frozen=True)
class Rates:
    """Seconds measured on this machine through the methods' own calls.

    ``answer_s``: per answered item, by ``answer_key(recipe, decoding)``; ``label_s``: per item scored
    through ``label_parts.shared_distribution``, by ``label_key(recipe, purpose)`` ("answer" items come
    a user's few test items at a time, "fit" items a user's training items at once); ``train_s``: per
    training row of one epoch, by ``train_key(part, recipe)`` (part "personal" or "adapter"), and
    ``pass_s``: the fixed cost of one forward/backward pass on top (personal modules, whose passes are
    counted from the trainer's schedule, ``planned_passes``; none for the task adapter, whose passes are
    all full and timed as such), with ``row_tokens``, the rows' typical padded length, which decides
    how many rows a pass holds; ``validate_s``: per validation row of one epoch, by recipe tag;
    ``profile_s``: per PAG profile; ``load_s``: a base model loaded into an engine; ``measure_s``: what
    measuring took (part of the run's time)."""

    load_s: float
    answer_s: Mapping[str, float] = field(default_factory=dict)
    label_s: Mapping[str, float] = field(default_factory=dict)
    train_s: Mapping[str, float] = field(default_factory=dict)
    pass_s: Mapping[str, float] = field(default_factory=dict)
    row_tokens: Mapping[str, int] = field(default_factory=dict)
    validate_s: Mapping[str, float] = field(default_factory=dict)
    profile_s: float = 0.0
    measure_s: float = 0.0

    def get(self, table: str, key: str) -> float:
        """A rate the estimate needs; a missing one is a bug in ``needs`` (named, not a KeyError)."""
        rates = getattr(self, table)
        if key not in rates:
            raise ValueError(f"the work estimate has no {table} rate for {key!r} (measured: {sorted(rates)})")
        return rates[key]


def answer_key(recipe: Recipe, decoding: str, bare: bool = False) -> str:
    """``bare``: answered by the bare base model's engine (no module bank to run), not a module's."""
    return f"{'bare' if bare else 'module'}:{recipe.tag}:{decoding}"


def label_key(recipe: Recipe, purpose: str) -> str:
    return f"{recipe.tag}:{purpose}"


def train_key(part: str, recipe: Recipe) -> str:
    return f"{part}:{recipe.tag}"


@dataclass(frozen=True)
class Estimate:
    """Seconds per method (by the run's key), the caps they assume and the rates they come from."""

    per_method: dict[str, float]
    rates: Rates

    @property
    def seconds(self) -> float:
        """The whole run: measuring plus every method."""
        return self.rates.measure_s + sum(self.per_method.values())

    def lines(self) -> list[str]:
        parts = ", ".join(f"{name} {s / 60:.1f}" for name, s in self.per_method.items() if s >= 30)
        return [
            f"estimated {self.seconds / 60:.1f} min on this machine (measuring {self.rates.measure_s:.0f} s"
            + (f"; min: {parts})" if parts else ")")
        ]


def uses_task_adapter(method: Method) -> bool:
    """Whether ``method`` answers through the task adapter (trained on other users' examples)."""
    setup = method.setup
    on_adapter = isinstance(setup, PersonalSetup) and setup.on_task_adapter
    return on_adapter or isinstance(setup, (TaskAdapterSetup, *LABEL_SETUPS))


def cuts(asked: BenchConfig, fitted: BenchConfig) -> dict[str, list]:
    """The caps the budget changed, each as [asked, fitted] (None: no cap; ``left_out``: run keys)."""
    names = ("test_users", "user_examples", "adapter_examples", "left_out")
    return {
        name: [getattr(asked, name), getattr(fitted, name)]
        for name in names
        if getattr(asked, name) != getattr(fitted, name)
    }


# ---- what a plan needs measured -----------------------------------------------------------------------


@dataclass
class Needs:
    """The rates a plan's estimate reads."""

    answers: set[tuple[Recipe, str, bool]] = field(default_factory=set)  # (recipe, decoding, bare)
    labels: set[Recipe] = field(default_factory=set)  # label-model methods' scoring
    personal: set[Recipe] = field(default_factory=set)  # per-user module training
    adapter: set[Recipe] = field(default_factory=set)  # task adapter training
    profiles: bool = False


def needs(plan: Iterable[PlanEntry]) -> Needs:
    found = Needs()
    for _, method, decoding in plan:
        setup, recipe = method.setup, method.recipe
        if setup is None:
            continue
        found.profiles |= recipe.profile
        if isinstance(setup, BaseSetup | TaskAdapterSetup | PersonalSetup):
            found.answers.add((recipe, decoding, isinstance(setup, BaseSetup)))
        if isinstance(setup, TaskAdapterSetup):
            found.adapter.add(recipe)
        if isinstance(setup, PersonalSetup):
            found.personal.add(recipe)
            if setup.on_task_adapter:
                found.adapter.add(recipe)
        if isinstance(setup, LABEL_SETUPS):
            found.labels.add(recipe)
            found.adapter.add(recipe)
            if isinstance(setup, label_models.SelectSetup):
                found.personal.add(recipe)
        blend_with_model = isinstance(setup, blend.BlendSetup) and setup.model is not None
        if blend_with_model or isinstance(setup, collab.CollabSetup):
            found.labels.add(recipe)
            found.adapter.add(recipe)
        if not isinstance(setup, KNOWN_SETUPS):  # counted by its answers alone (``method_seconds``)
            found.answers.add((recipe, decoding, False))
    return found


LABEL_SETUPS = (label_models.BiasSetup, label_models.FusionSetup, label_models.SelectSetup)
KNOWN_SETUPS = (
    BaseSetup,
    TaskAdapterSetup,
    PersonalSetup,
    *LABEL_SETUPS,
    blend.BlendSetup,
    collab.CollabSetup,
)


# ---- measuring ----------------------------------------------------------------------------------------


def _seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _pilot_users(task: Task, users: Sequence[User], count: int, seed: int) -> list[User]:
    """A seeded sample of ``count`` users with training items (the shape of the run's users)."""
    pool = [u for u in users if task.training_examples(u)] or list(users)
    return random.Random(seed).sample(pool, min(count, len(pool)))


def _sample(examples: Sequence[Example], count: int, seed: str) -> list[Example]:
    """``count`` of ``examples`` drawn at random, so a pilot's rows have the lengths of all of them."""
    return random.Random(seed).sample(list(examples), min(count, len(examples)))


def _train_seconds(engine: Engine, jobs: list, config: TrainConfig) -> float:
    """One epoch of ``jobs`` (their validation left out) through the trainer."""
    trainer = MultiUserTrainer(engine, replace(config, epochs=1))
    return _seconds(lambda: trainer.run([replace(job, val=[]) for job in jobs]))


def _train_seconds_per_row(engine: Engine, jobs: list, config: TrainConfig) -> float:
    return _train_seconds(engine, jobs, config) / max(1, sum(len(job.train) for job in jobs))


def _pass_and_row_seconds(engine: Engine, jobs: list, config: TrainConfig) -> tuple[float, float, int]:
    """(fixed seconds of a forward/backward pass, seconds per row, the rows' typical padded length in
    tokens) of personal training: one step of a user's batch, and one of ``micro_batch_rows`` rows of
    several users' batches, timed through the trainer; each step's passes counted as the trainer cuts
    them (``pass_ranges``), and the two costs solved from the two steps. A rate per row alone, timed on
    8 rows, was 0.6x of what tate took (its passes hold 16 rows) and 1.3x of a LaMP-5 file's."""
    one = jobs[:1]
    full = [
        replace(jobs[i % len(jobs)], user_id=f"{jobs[i % len(jobs)].user_id}#{i}")
        for i in range(max(1, config.micro_batch_rows // config.batch_size))
    ]

    # Each pilot job's row lengths in tokens, encoded once (``full`` repeats the jobs, ``one`` is its first).
    lengths = [
        engine.encode([Row(prompt, target) for prompt, target in job.train])
        .attention_mask.sum(dim=1)
        .tolist()
        for job in jobs
    ]

    def passes(group: list) -> int:
        batches = [lengths[i % len(jobs)] for i in range(len(group))]
        return len(pass_ranges(batches, config.micro_batch_rows, config.micro_batch_tokens))

    row_tokens = round(statistics.fmean(max(lengths[i % len(jobs)]) for i in range(len(full))))
    (p1, r1), (p2, r2) = ((passes(g), sum(len(job.train) for job in g)) for g in (one, full))
    t1, t2 = _train_seconds(engine, one, config), _train_seconds(engine, full, config)
    determinant = p1 * r2 - p2 * r1
    if determinant:
        fixed, row = (t1 * r2 - t2 * r1) / determinant, (p1 * t2 - p2 * t1) / determinant
        if fixed >= 0 and row >= 0:
            return fixed, row, row_tokens
    return 0.0, t2 / max(1, r2), row_tokens  # one size of pass, or noise: a rate per row


def measure(deps: MethodDeps, plan: Sequence[PlanEntry], users: Sequence[User]) -> Rates:
    """Time what ``plan``'s methods will do, on a pilot of ``users`` (the run's test users) and
    ``deps.adapter_users``, through the methods' own code (see the module's docstring). ``deps`` is the
    run's; the pilot writes nothing into its folders (modules and profiles go to a scratch place)."""
    started = time.perf_counter()
    task, settings = deps.task, deps.settings
    wanted = needs(plan)
    pilot = _pilot_users(task, users, settings.answer_group, settings.seed)
    if not pilot:
        raise ValueError(f"task {task.name}: no users to measure the work on")
    base = deps.load_base()  # the first load also reads the files: later loads, the run's, are warm
    load_s = _seconds(deps.load_base)
    engine = Engine(
        base, TASK_ADAPTER.spec, slots=settings.users_per_step + 1, max_length=settings.max_length
    )
    with tempfile.TemporaryDirectory() as scratch:
        profiles = Profiles(
            task,
            lambda: engine,
            items=settings.profile_items,
            seed=settings.seed,
            max_new_tokens=settings.profile_tokens,
        )
        scratch_deps = replace(deps, modules=scratch, profiles=profiles, trace=None)
        profile_s = 0.0
        if wanted.profiles:  # one batch of profiles, as the writer makes them; later prompts show them
            profile_s = _seconds(lambda: profiles.ensure(pilot[:PILOT_PROFILES])) / len(
                pilot[:PILOT_PROFILES]
            )
        answer_s = _measure_answers(scratch_deps, engine, wanted, pilot)
        label_s = _measure_labels(scratch_deps, engine, wanted, pilot)
        train_s, pass_s, row_tokens, validate_s = _measure_training(scratch_deps, engine, wanted, pilot)
    return Rates(
        load_s=load_s,
        answer_s=answer_s,
        label_s=label_s,
        train_s=train_s,
        pass_s=pass_s,
        row_tokens=row_tokens,
        validate_s=validate_s,
        profile_s=profile_s,
        measure_s=time.perf_counter() - started,
    )


def _test_queries(users: Sequence[User], count: int) -> list[tuple[User, Example]]:
    """Up to ``count`` test items, a user's together as the answerer groups them; a task with one test
    item per user (LaMP) gets one of each of ``count`` users, a batch as the run answers them."""
    return [(u, e) for u in users for e in u.test][:count]


def _measure_answers(
    deps: MethodDeps, engine: Engine, wanted: Needs, pilot: Sequence[User]
) -> dict[str, float]:
    """Per-item seconds of ``answer_examples`` for each (recipe, decoding, engine) the plan answers with:
    the bare base's engine for the prompt-side methods (as ``deps.bare_engine`` builds it: no module
    bank, about half the time of an engine with one on this machine), ``engine`` (a LoRA bank) for the
    rest. Each engine first answers the pilot once, which pays what a method's first batch pays once
    (allocations, kernel choice for the batch's shapes)."""
    queries = _test_queries(pilot, PILOT_ANSWERS if deps.task.labels else PILOT_GENERATIONS)
    rates: dict[str, float] = {}
    if not queries or not wanted.answers:
        return rates
    used = {bare for _, _, bare in wanted.answers}
    engines = {False: engine} if False in used else {}
    if True in used:
        engines[True] = deps.bare_engine()  # the scratch deps' own, built as the run's will be
    plain = deps.builder(Recipe(), engine.tokenizer)
    for bare, answering in engines.items():
        first = next(d for _, d, b in wanted.answers if b == bare)
        answer_examples(deps, "estimate", answering, plain, queries, [0] * len(queries), first)
    for recipe, decoding, bare in sorted(wanted.answers, key=lambda a: (a[0].tag, a[1], a[2])):
        builder = deps.builder(recipe, engine.tokenizer)
        # A profile prompt of a user without one would write it inside the timing: only profiled users.
        asked = _test_queries(pilot[:PILOT_PROFILES], len(queries)) if recipe.profile else queries
        seconds = _seconds(
            lambda b=builder, d=decoding, q=asked, e=engines[bare]: answer_examples(
                deps, "estimate", e, b, q, [0] * len(q), d
            )
        )
        rates[answer_key(recipe, decoding, bare)] = seconds / len(asked)
    return rates


def _measure_labels(
    deps: MethodDeps, engine: Engine, wanted: Needs, pilot: Sequence[User]
) -> dict[str, float]:
    rates: dict[str, float] = {}
    for recipe in sorted(wanted.labels, key=lambda r: r.tag):
        answerer = Answerer(
            deps, "estimate", engine, deps.builder(recipe, engine.tokenizer), deps.settings.answer_group
        )
        asked = label_models.labelled_queries(deps.task, _test_queries(pilot, PILOT_ANSWERS))
        if asked:
            seconds = _seconds(lambda a=answerer, q=asked: label_parts.shared_distribution(a, q, "answer"))
            rates[label_key(recipe, "answer")] = seconds / len(asked)
        # A user's training items are scored in one call: two users' worth of a pilot batch.
        fitted = [
            (u, e)
            for u in pilot[:2]
            for e in _sample(deps.task.training_examples(u), PILOT_ANSWERS // 2, f"fit:{u.id}")
        ]
        fitted = label_models.labelled_queries(deps.task, fitted)
        if fitted:
            seconds = _seconds(lambda a=answerer, q=fitted: label_parts.shared_distribution(a, q, "train"))
            rates[label_key(recipe, "fit")] = seconds / len(fitted)
        rates.setdefault(label_key(recipe, "fit"), rates.get(label_key(recipe, "answer"), 0.0))
        rates.setdefault(label_key(recipe, "answer"), rates[label_key(recipe, "fit")])
    return rates


def _measure_training(
    deps: MethodDeps, engine: Engine, wanted: Needs, pilot: Sequence[User]
) -> tuple[dict[str, float], dict[str, float], dict[str, int], dict[str, float]]:
    """Per-row seconds of a trainer step for each recipe a per-user module or the task adapter trains
    with, a personal module's fixed seconds per pass and typical row length, and the validation loss's
    seconds per row after an epoch."""
    settings = deps.settings
    train_s: dict[str, float] = {}
    pass_s: dict[str, float] = {}
    row_tokens: dict[str, int] = {}
    validate_s: dict[str, float] = {}
    personal = TrainConfig(
        epochs=1,
        batch_size=settings.batch_size,
        learning_rate=OPPU_PERSONAL.learning_rate,
        seed=settings.seed,
        users_per_step=settings.users_per_step,
    )
    warmed = False
    for recipe in sorted(wanted.personal | wanted.adapter, key=lambda r: r.tag):
        builder = deps.builder(recipe, engine.tokenizer)
        jobs = []
        for user in pilot[:PILOT_PASS_USERS]:
            job = personal_job(deps, builder, "estimate", user)
            picked = _sample(range(len(job.train)), settings.batch_size, f"train:{user.id}")
            jobs.append(replace(job, train=[job.train[i] for i in picked]))
        if not warmed:  # a first step pays what the run's first step pays once (a user's batch: 1.5x)
            _train_seconds(engine, [replace(jobs[0], user_id=f"{jobs[0].user_id}#warm")], personal)
            warmed = True
        if recipe in wanted.personal:
            key = train_key("personal", recipe)
            pass_s[key], train_s[key], row_tokens[key] = _pass_and_row_seconds(engine, jobs, personal)
        if recipe in wanted.adapter:
            train_s[train_key("adapter", recipe)] = _adapter_row_seconds(deps, engine, builder, recipe)
        val = [pair for job in jobs for pair in job.val][:PILOT_ANSWERS]
        if val:
            trainer = MultiUserTrainer(engine, personal)
            validate_s[recipe.tag] = _seconds(lambda t=trainer, v=val: t.validation_loss(v, 1)) / len(val)
        else:
            validate_s[recipe.tag] = 0.0
    return train_s, pass_s, row_tokens, validate_s


def _adapter_row_seconds(deps: MethodDeps, engine: Engine, builder, recipe: Recipe) -> float:
    """One of the task adapter's steps on its own pooled rows (other users' examples), per row."""
    settings = deps.settings
    if not deps.adapter_users:
        return 0.0
    if recipe.profile:
        deps.profiles.ensure(_pilot_users(deps.task, deps.adapter_users, PILOT_USERS, settings.seed))
    pooled = [(u, e) for u in deps.adapter_users for e in deps.task.training_examples(u)]
    picked = random.Random(settings.seed).sample(pooled, min(settings.adapter_batch_size, len(pooled)))
    if recipe.profile:  # only the users whose profiles the pilot wrote
        written = {u.id for u in _pilot_users(deps.task, deps.adapter_users, PILOT_USERS, settings.seed)}
        picked = [(u, e) for u, e in pooled if u.id in written][: settings.adapter_batch_size]
    job = training_job(deps, builder, "estimate", TaskAdapterSetup.USER, picked)
    config = replace(TaskAdapterSetup.train_config(deps), epochs=1)
    return _train_seconds_per_row(engine, [job], config)


# ---- counting -----------------------------------------------------------------------------------------


def _capped(task: Task, user: User, cap: int | None) -> int:
    return min(len(task.training_examples(user)), cap or math.inf)


def method_seconds(
    method: Method,
    decoding: str,
    task: Task,
    users: Sequence[User],
    adapter_users: Sequence[User],
    config: BenchConfig,
    rates: Rates,
    counted: set[str],
) -> float:
    """The seconds ``method`` takes for ``users``; shared parts (the task adapter, profiles, the bare
    engine, a module store two methods use) count once, the first time, by their key in ``counted``."""
    setup, recipe, settings = method.setup, method.recipe, config.method_settings()
    if setup is None:
        return 0.0  # rule baselines count and sort a few thousand answers: no model, no measurable time
    tag = recipe.tag
    total = 0.0
    answers = sum(len(u.test) for u in users)
    val = sum(len(u.val) for u in users)

    def once(key: str, seconds: float) -> None:
        nonlocal total
        if key not in counted:
            counted.add(key)
            total += seconds

    def profiles(whose: str, count: int) -> None:
        if recipe.profile:
            once(f"profiles:{whose}", count * rates.profile_s)

    # The shared model's rows (``TaskAdapterSetup.pooled``): its capped training examples and the
    # validation examples it checks each epoch, of the task adapter's users.
    pooled = sum(len(task.training_examples(u)) for u in adapter_users)
    examples = min(pooled, config.adapter_examples or pooled)
    adapter_val = sum(len(u.val) for u in adapter_users)
    checked = min(adapter_val, settings.adapter_val_examples)

    def adapter(shared: TaskAdapterSetup) -> None:
        """The shared model's training (its engine, an epoch's rows and validation each epoch)."""
        profiles("adapter", len(adapter_users))
        per_epoch = examples * rates.get("train_s", train_key("adapter", recipe)) + checked * rates.get(
            "validate_s", tag
        )
        once(f"{shared.STORE}:{tag}", rates.load_s + settings.adapter_epochs * per_epoch)

    def personal(key: str) -> None:
        """Every pass the trainer will make (``planned_passes``), and validation each epoch."""
        rows = [_capped(task, u, config.user_examples) for u in users]
        schedule = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size)
        trained = train_key("personal", recipe)
        passes = planned_passes(schedule, settings.users_per_step, rows, rates.row_tokens.get(trained, 0))
        once(
            key,
            len(passes) * rates.pass_s.get(trained, 0.0)
            + sum(passes) * rates.get("train_s", trained)
            + settings.epochs * val * rates.get("validate_s", tag),
        )

    def biases(store: str) -> None:
        fit = sum(_capped(task, u, config.user_examples) for u in users)
        once(
            f"biases:{store}:{tag}",
            fit * rates.get("label_s", label_key(recipe, "fit"))
            + val * rates.get("label_s", label_key(recipe, "answer")),
        )

    def collab_training() -> None:
        """The task adapter, then the shared MLP: its epochs over the adapter's rows (a backward through
        the frozen model each, as the adapter's steps) and a validation pass before and after each."""
        adapter(TaskAdapterSetup())
        mlp = collab.PROJECTOR_EPOCHS * examples * rates.get("train_s", train_key("adapter", recipe))
        checks = (1 + collab.PROJECTOR_EPOCHS) * checked * label_answer
        once(f"collab:{tag}", rates.load_s + mlp + checks)

    label_answer = rates.label_s.get(label_key(recipe, "answer"), 0.0)
    if isinstance(setup, BaseSetup):
        once("bare", rates.load_s)
        profiles("test", len(users))
        total += answers * rates.get("answer_s", answer_key(recipe, decoding, bare=True))
    elif isinstance(setup, TaskAdapterSetup):
        adapter(setup)
        profiles("test", len(users))
        total += rates.load_s + answers * rates.get("answer_s", answer_key(recipe, decoding))
    elif isinstance(setup, PersonalSetup):
        if setup.on_task_adapter:
            adapter(TaskAdapterSetup())
        profiles("test", len(users))
        personal(f"personal:{method.name}")
        total += rates.load_s + answers * rates.get("answer_s", answer_key(recipe, decoding))
    elif isinstance(setup, label_models.BiasSetup):
        adapter(setup.shared)
        biases(setup.store)
        total += rates.load_s + answers * label_answer
    elif isinstance(setup, label_models.FusionSetup):
        adapter(TaskAdapterSetup())
        total += rates.load_s + (val + answers) * label_answer
    elif isinstance(setup, label_models.SelectSetup):
        adapter(TaskAdapterSetup())
        personal(f"personal:{setup.MODULE_METHOD}")
        biases(label_models.BiasSetup().store)
        # two engines (its modules' and its biases'), both scored on validation, each user answered once
        total += 2 * rates.load_s + (2 * val + answers) * label_answer
    elif isinstance(setup, blend.BlendSetup):
        # The model's label distribution on the validation answers the blend is fitted on (its test
        # users' and the task adapter's users') and on every answer; the statistics cost nothing here.
        if setup.model is not None:
            if isinstance(setup.model, collab.CollabSetup):
                collab_training()
            else:
                adapter(setup.model)
            rows = val + adapter_val  # every one of the adapter's users' answers, uncapped
            total += rates.load_s + (rows + answers) * label_answer
    elif isinstance(setup, collab.CollabSetup):
        collab_training()
        total += answers * label_answer
    else:  # a setup this estimate does not know: its engine and its answers at least
        total += rates.load_s + answers * rates.answer_s.get(answer_key(recipe, decoding), 0.0)
    return total


def estimate(
    plan: Sequence[PlanEntry],
    task: Task,
    users: Sequence[User],
    adapter_users: Sequence[User],
    config: BenchConfig,
    rates: Rates,
) -> Estimate:
    counted: set[str] = set()
    per_method = {
        key: method_seconds(method, decoding, task, users, adapter_users, config, rates, counted)
        for key, method, decoding in plan
    }
    return Estimate(per_method, rates)


def fit_budget(
    plan: Sequence[PlanEntry], task: Task, config: BenchConfig, rates: Rates
) -> tuple[BenchConfig, Estimate]:
    """``config`` with the loosest caps whose estimate fits ``config.budget_minutes``, and that
    estimate: fewer test users first (never below ``MIN_TEST_USERS``), then fewer training items per test
    user, then fewer task-adapter examples (each loosest first). A run that does not fit even fully capped
    leaves out methods (``config.left_out``), the costliest first, of a family whose first method in the
    plan it keeps: every family the plan asked for is still compared. One that does not fit even so keeps
    the tightest caps (its estimate says by how much). A run that fits keeps its config."""

    def sized(candidate: BenchConfig) -> Estimate:
        test, adapter = split_users(task, candidate)
        return estimate(kept(plan, candidate), task, test, adapter, candidate, rates)

    current = sized(config)
    if config.budget_minutes is None:
        return config, current
    budget = config.budget_minutes * 60

    def fits(candidate: BenchConfig) -> tuple[bool, Estimate]:
        found = sized(candidate)
        return found.seconds <= budget, found

    if current.seconds <= budget:
        return config, current
    users = len(split_users(task, config)[0])
    for count in range(users - 1, MIN_TEST_USERS - 1, -1):
        config = replace(config, test_users=count)
        ok, current = fits(config)
        if ok:
            return config, current
    test, _ = split_users(task, config)
    largest = max((len(task.training_examples(u)) for u in test), default=0)
    for cap in (c for c in USER_ITEM_CAPS if c < largest):
        config = replace(config, user_examples=cap)
        ok, current = fits(config)
        if ok:
            return config, current
    for cap in ADAPTER_EXAMPLE_CAPS:
        if config.adapter_examples is not None and cap >= config.adapter_examples:
            continue
        config = replace(config, adapter_examples=cap)
        ok, current = fits(config)
        if ok:
            return config, current
    while (costliest := _costliest_sibling(kept(plan, config), current)) is not None:
        config = replace(config, left_out=(*config.left_out, costliest))
        ok, current = fits(config)
        if ok:
            return config, current
    return config, current


def kept(plan: Sequence[PlanEntry], config: BenchConfig) -> list[PlanEntry]:
    """``plan`` without the methods the budget left out (``config.left_out``, by the run's key)."""
    return [entry for entry in plan if entry[0] not in config.left_out]


def _costliest_sibling(plan: Sequence[PlanEntry], current: Estimate) -> str | None:
    """The run key of the costliest method with estimated work whose family has an earlier method in
    ``plan`` (which stays), or None."""
    first: dict[str, str] = {}
    candidates = []
    for key, method, _ in plan:
        if first.setdefault(method.family, key) != key and current.per_method.get(key, 0.0) > 0:
            candidates.append(key)
    # Of equal costs (the per-user kinds), the latest in the plan goes first: the plan's order is the
    # order its author ranked them in.
    return max(reversed(candidates), key=lambda key: current.per_method[key], default=None)


def cap_training_items(task: Task, users: Sequence[User], cap: int | None, seed: int) -> dict[str, int]:
    """Keep at most ``cap`` of each user's training items (a seeded sample, in their order), in place:
    every method, the baselines too, then sees the same items. Returns each cut user's item count before
    the cut, by user id."""
    cut: dict[str, int] = {}
    if cap is None:
        return cut
    for user in users:
        if len(user.train) > cap:
            cut[user.id] = len(user.train)
            keep = set(random.Random(f"{seed}:{user.id}").sample(range(len(user.train)), cap))
            user.train = [e for i, e in enumerate(user.train) if i in keep]
    return cut
