"""Where does the memory go when the engine trains users? One training step of ``users_per_batch`` users on
real task rows (the benchmark's shape: ``train_batch`` rows per user, micro-batches of the trainer's
``micro_batch_rows`` rows), taken apart:

- sizes torch accounts for exactly: the base weights, the bank, its gradients, the optimizer moments;
- the activations autograd keeps for the backward pass, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage once, parameters excluded) for one
  micro-batch of task rows and one of long rows (``memory_long_tokens``), grouped by width (feed-forward,
  hidden, attention heads, vocabulary), against an analytic estimate for a Llama-style layer;
- RSS: what loading one more base costs (every ``Engine`` wraps its own freshly loaded base), the peak
  rise of a step, what stays resident after it, and how much of that glibc hands back on
  ``malloc_trim(0)`` (memory the allocator kept cached, not memory still in use).

``tracemalloc`` sees only Python's allocator, not torch's, so it is not used.
"""

from __future__ import annotations

import ctypes
import gc
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from tailorlm import kinds
from tailorlm.engine.engine import IGNORE, Engine, Row
from tailorlm.perf import workloads
from tailorlm.perf.harness import Bench, FactTable, PeakRSS, Section, rss_bytes
from tailorlm.perf.train import LEARNING_RATE, train_kind
from tailorlm.train.trainer import MultiUserTrainer, TrainConfig, UserData

MB = 2**20
VOCAB = "vocabulary projection (label positions)"
FEED_FORWARD = "feed-forward width"
HIDDEN = "hidden width"
HEADS = "attention, per head (q, k, v, output, rotary)"
MASK = "attention masks (rows x positions x positions)"
OTHER = "other (module terms, norm scales)"
GROUPS = (FEED_FORWARD, HIDDEN, HEADS, MASK, VOCAB, OTHER)


class SavedTensors:
    """Bytes autograd saves for backward inside ``watching()``, by width group (``group``)."""

    def __init__(self, model: torch.nn.Module, parameters: Iterable[torch.Tensor]) -> None:
        config = model.config
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.hidden = config.hidden_size
        self.feed_forward = getattr(config, "intermediate_size", None)
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // config.num_attention_heads
        self.skip = {p.untyped_storage().data_ptr() for p in parameters}
        self.storages: dict[int, tuple[int, str]] = {}  # storage address -> (bytes, group)

    def group(self, shape: tuple[int, ...]) -> str:
        if self.vocab in shape:
            return VOCAB
        if self.feed_forward in shape:
            return FEED_FORWARD
        if len(shape) == 4 and shape[-1] == self.head_dim:  # [rows, heads, positions, head_dim]
            return HEADS
        if len(shape) == 4 and shape[1] == 1:  # [rows, 1, queries, keys]
            return MASK
        return HIDDEN if shape and shape[-1] == self.hidden else OTHER

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address not in self.skip and address not in self.storages:
            self.storages[address] = (storage.nbytes(), self.group(tuple(tensor.shape)))
        return tensor  # saved exactly as it would be without the hook

    @contextmanager
    def watching(self) -> Iterator[SavedTensors]:
        """Count inside this block. One backward pass only: after it, freed addresses may be reused."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self

    @property
    def total(self) -> int:
        return sum(size for size, _ in self.storages.values())

    def by_group(self) -> dict[str, int]:
        groups: dict[str, int] = defaultdict(int)
        for size, name in self.storages.values():
            groups[name] += size
        return dict(groups)


def activation_estimate(
    model: torch.nn.Module, rows: int, width: int, label_positions: int = 0
) -> int | None:
    """Bytes a Llama-style decoder keeps for backward in one plain fp32 pass over ``rows`` x ``width``
    positions. Per layer and position: 3 x intermediate (gate, up and act(gate), for the MLP's product
    rule), 3 x hidden (the two norms' inputs and the normed input the adapted projections see), and 4 x
    the query width (q, and k and v repeated to every query head for SDPA, and the attention output:
    grouped-query attention saves nothing here); per layer one fp32 attention mask of rows x width x
    width; per label position one vocabulary-wide row (the log-softmax the loss keeps). Module terms and
    rotary tables are left out (small). None for a model without these config fields."""
    config = model.config
    vocab = model.get_output_embeddings().weight.shape[0]
    try:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_position = (
            3 * config.intermediate_size + 3 * config.hidden_size + 4 * config.num_attention_heads * head_dim
        )
        per_layer = rows * width * per_position + rows * width * width
        return 4 * (config.num_hidden_layers * per_layer + vocab * label_positions)
    except AttributeError:
        return None


def release_free_heap() -> bool:
    """Ask glibc to give freed heap memory back to the OS (``malloc_trim(0)``); False where it cannot."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Probe:
    """One training step of some users, watched: saved activations and the RSS peak."""

    rows: int
    width: int  # columns of the batch the rows make when encoded together
    positions: int  # positions the decoder ran (engine's count; prefix sharing makes it smaller)
    label_positions: int
    saved: int
    groups: dict[str, int]
    peak: PeakRSS

    def to_dict(self) -> dict:
        fields = {k: v for k, v in self.__dict__.items() if k != "peak"}
        return {**fields, **self.peak.to_dict()}


def probe(engine: Engine, config: TrainConfig, users: list[UserData]) -> Probe:
    """Train ``users`` for one step, in one pass whatever its padded tokens (the trainer would cut long
    rows into several: this sizes the pass it no longer makes), and watch it (saved bytes are exact when
    the rows fit one micro-batch)."""
    saved = SavedTensors(engine.model, [*engine.model.parameters(), *engine.bank.tensors.values()])
    batch = engine.encode([Row(*pair) for user in users for pair in user.train])
    before = getattr(engine, "positions_run", None)
    gc.collect()
    release_free_heap()  # start from an empty allocator cache, so the RSS rise is this step's own need
    with PeakRSS() as peak, saved.watching():
        one_pass = max(config.micro_batch_tokens, batch.input_ids.numel())
        MultiUserTrainer(engine, replace(config, users_per_step=len(users), micro_batch_tokens=one_pass)).run(
            users
        )
    positions = engine.positions_run - before if before is not None else batch.input_ids.numel()
    return Probe(
        rows=len(batch),
        width=batch.input_ids.shape[1],
        positions=positions,
        label_positions=int((batch.labels[:, 1:] != IGNORE).sum()),
        saved=saved.total,
        groups=saved.by_group(),
        peak=peak,
    )


def _loaded_base_rss(bench: Bench):
    """A freshly loaded base and the RSS it added once every weight was touched by a forward pass."""
    ids = torch.tensor(
        [[bench.tokenizer.eos_token_id] * 8], device=bench.bare.device
    )  # may load the bare base
    gc.collect()
    # Empty the allocator's cache first: pages it kept from earlier steps would hold the new weights
    # without any RSS growth (or be given back during the load and make the difference negative).
    release_free_heap()
    before = rss_bytes()
    base = bench.fresh_base()
    with torch.inference_mode():
        base.model(input_ids=ids)
    return base, rss_bytes() - before


def _long_users(bench: Bench, users: int) -> list[UserData]:
    """``users`` users x ``train_batch`` chat rows of about ``memory_long_tokens`` tokens each."""
    config = bench.config
    per_user = config.train_batch
    prompts = workloads.chat_prompts(
        bench.tokenizer, config.memory_long_tokens, users * per_user, config.seed
    )
    return [
        UserData(f"long{u}", [(p, "3 stars") for p in prompts[u * per_user : (u + 1) * per_user]])
        for u in range(users)
    ]


@dataclass
class Measured:
    """Everything the memory section measured, before it is laid out as tables."""

    engine: Engine
    users: int
    base_rss: int  # RSS one freshly loaded base added (after a forward touched every weight)
    extra_rss: int  # the same, for one more base loaded at the end
    moments: int  # bytes of the optimizer's moments (torch's own sizes)
    step: Probe  # one step of every user
    given_back: int | None  # RSS malloc_trim(0) returned after the step (None: no malloc_trim)
    probes: dict[str, Probe]  # one micro-batch each: task rows, long rows


def measure(bench: Bench) -> Measured:
    config = bench.config
    users = config.users_per_batch
    base, base_rss = _loaded_base_rss(bench)
    per_micro = max(1, TrainConfig().micro_batch_rows // config.train_batch)  # whole users per micro-batch
    engine = Engine(
        base,
        kinds.default_spec(train_kind()),
        slots=max(users, per_micro) + 1,
        max_length=max(config.task_max_length, config.memory_long_tokens + 16),
    )
    train_config = TrainConfig(
        epochs=1,
        batch_size=config.train_batch,
        learning_rate=LEARNING_RATE,
        users_per_step=users,
        seed=config.seed,
    )
    optimizer = MultiUserTrainer(engine, train_config).optimizer
    moments = tensor_bytes([*optimizer.exp_avg.values(), *optimizer.exp_avg_sq.values()])
    del optimizer
    task_rows = workloads.task_users(
        bench.tokenizer, config.task, max(users, per_micro), config.train_batch, config.seed
    )
    bench.log(f"memory: one training step of {users} users on {config.task} rows")
    step = probe(engine, train_config, task_rows[:users])
    before_trim = rss_bytes()
    given_back = before_trim - rss_bytes() if release_free_heap() else None
    probes = {config.task: probe(engine, train_config, task_rows[:per_micro])}
    if config.memory_long_tokens:
        label = f"~{config.memory_long_tokens}-token"
        bench.log(f"memory: one micro-batch of {label} rows")
        probes[label] = probe(engine, train_config, _long_users(bench, per_micro))
    bench.log("memory: loading one more base model")
    _, extra_rss = _loaded_base_rss(bench)
    return Measured(engine, users, base_rss, extra_rss, moments, step, given_back, probes)


def bench_memory(bench: Bench) -> Section:
    config = bench.config
    measured = measure(bench)
    engine, step = measured.engine, measured.step
    section = Section(
        "memory",
        f"Memory of training {measured.users} users of {engine.base.name} on {config.task} rows: batch "
        f"{config.train_batch} per user, micro-batches of {TrainConfig().micro_batch_rows} rows",
    )
    model = engine.model
    bank = tensor_bytes(engine.bank.tensors.values())
    base_bytes = tensor_bytes(model.parameters())
    section.tables = [_breakdown(measured, bank, base_bytes), _groups_table(measured.probes)]
    section.facts.update(
        {
            "base_weight_bytes": base_bytes,
            "base_rss_bytes": measured.base_rss,
            "extra_base_rss_bytes": measured.extra_rss,
            "bank_bytes": bank,
            "optimizer_moment_bytes": measured.moments,
            "step": step.to_dict(),
            "step_rss_given_back_by_trim_bytes": measured.given_back,
            "probes": {label: watched.to_dict() for label, watched in measured.probes.items()},
        }
    )
    section.notes += _findings(base_bytes, measured.extra_rss, measured.probes)
    return section


def _breakdown(measured: Measured, bank: int, base_bytes: int) -> FactTable:
    """Component | analytic MB | measured MB | measured by."""
    engine, step = measured.engine, measured.step
    model = engine.model
    vocab = model.get_output_embeddings().weight.shape[0]
    numbers = engine.bank.parameter_count()
    table = FactTable(
        "where the memory goes (analytic activations: a plain pass, no shared prefix)",
        ["component", "analytic MB", "measured MB", "measured by"],
    )
    rss_load = "RSS: load + one forward"
    table.rows += [
        [
            f"base weights ({sum(p.numel() for p in model.parameters()):,} numbers, {model.dtype})",
            base_bytes / MB,
            measured.base_rss / MB,
            rss_load,
        ],
        [
            f"bank: {engine.bank.slots} slots x {numbers:,} numbers",
            4 * engine.bank.slots * numbers / MB,
            bank / MB,
            "tensor sizes",
        ],
        ["bank gradients (dense over every slot, during a step)", bank / MB, None, "-"],
        [
            "optimizer moments (exp_avg + exp_avg_sq, every slot)",
            2 * bank / MB,
            measured.moments / MB,
            "tensor sizes",
        ],
    ]
    for label, watched in measured.probes.items():
        table.rows += [
            [
                f"activations for backward: {watched.rows} {label} rows x {watched.width} "
                f"({watched.positions:,} positions run)",
                _mb(activation_estimate(model, watched.rows, watched.width, watched.label_positions)),
                watched.saved / MB,
                "saved-tensor hooks",
            ],
            [
                f"  of which the vocabulary projection at {watched.label_positions} label positions",
                4 * watched.label_positions * vocab / MB,
                watched.groups.get(VOCAB, 0) / MB,
                "saved-tensor hooks",
            ],
            [
                f"  full logits of {watched.rows} rows x {watched.width} (stock PEFT's labels=), one copy",
                4 * watched.rows * watched.width * vocab / MB,
                None,
                "-",
            ],
            ["  peak RSS rise of that step", None, watched.peak.increase / MB, "RSS high-water mark"],
        ]
    given_back = measured.given_back
    table.rows += [
        [
            f"training step, {step.rows} rows of {measured.users} users: peak RSS rise",
            None,
            step.peak.increase / MB,
            "RSS high-water mark",
        ],
        ["  RSS still held after the step", None, (step.peak.end - step.peak.start) / MB, "RSS"],
        [
            "  of which malloc_trim(0) gave back (allocator cache, not in use)",
            None,
            None if given_back is None else given_back / MB,
            "RSS" if given_back is not None else "no malloc_trim here",
        ],
        [
            "one more base model (each Engine wraps its own)",
            base_bytes / MB,
            measured.extra_rss / MB,
            rss_load,
        ],
    ]
    return table


def _groups_table(probes: dict[str, Probe]) -> FactTable:
    columns = [f"{label} MB" for label in probes] + [f"{label} KB per position" for label in probes]
    table = FactTable("activations kept for backward, by width (one micro-batch)", ["group", *columns])
    for group in GROUPS:
        sizes = [watched.groups.get(group, 0) for watched in probes.values()]
        per_position = [
            size / watched.positions / 1024 for size, watched in zip(sizes, probes.values(), strict=True)
        ]
        table.rows.append([group, *[size / MB for size in sizes], *per_position])
    return table


def _findings(base_bytes: int, extra_rss: int, probes: dict[str, Probe]) -> list[str]:
    notes = []
    for label, watched in probes.items():
        plain = watched.rows * watched.width
        shared = (
            f" (prefix sharing ran {watched.positions:,} of the {plain:,} positions of a plain pass, but "
            "every row keeps its own copy of its prefix's keys and values)"
            if watched.positions < plain
            else ""
        )
        notes.append(
            f"{label} rows: {watched.saved / watched.positions / 1024:.0f} KB of activations per position "
            f"run{shared}; {watched.rows} rows x {watched.width} columns keep {watched.saved / 2**30:.2f} "
            f"GiB for backward and raise the peak RSS by {watched.peak.increase / 2**30:.2f} GiB."
        )
    longest = max(probes.values(), key=lambda watched: watched.saved)
    two_bases = 2 * max(extra_rss, base_bytes)
    notes.append(
        f"a process holding two bases (as the benchmark's setups do: a bare engine for the prompt methods "
        f"and an engine per trained method) and training micro-batches like the largest here needs about "
        f"{(two_bases + longest.peak.increase) / 2**30:.1f} GiB: {two_bases / 2**30:.1f} for the bases + "
        f"{longest.peak.increase / 2**30:.1f} for the step."
    )
    return notes


def _mb(value: int | None) -> float | None:
    return None if value is None else value / MB
