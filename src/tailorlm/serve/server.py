"""The serving process's parts, built from a ``ServeConfig``. ``Server``: what every server has in front of
its scheduler (the store and users service, keys and limits, metrics, retraining jobs, label requests'
prompts), whatever ``JobScheduler`` runs the jobs. ``LocalServer``: one that runs them here, with one base
model, an engine with a bank per module layout in the store (a batch mixes users of every kind), a slot
manager per bank loading modules from the store on demand, and the scheduler thread."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tailorlm import kinds, models
from tailorlm.data.schema import Example, HistoryItem, User
from tailorlm.engine.bank import EngineError
from tailorlm.engine.engine import Engine, label_memory
from tailorlm.engine.slots import SlotManager
from tailorlm.kinds import ModuleSpec
from tailorlm.methods.baselines import label_by_rule
from tailorlm.methods.blend_part import BlendPart
from tailorlm.methods.profiles import UserProfile
from tailorlm.methods.recipes import PromptBuilder
from tailorlm.methods.retrieval import RetrieverCache
from tailorlm.serve.config import ServeConfig, recipe_from_name
from tailorlm.serve.metrics import ServeMetrics
from tailorlm.serve.protocol import ApiError, invalid_key, model_not_found
from tailorlm.serve.scheduler import JobScheduler, Scheduler, key_user
from tailorlm.serve.training import TrainingJobs
from tailorlm.store.index_backends import StoreLocationError
from tailorlm.store.module_folder import ModuleFileError
from tailorlm.store.store import ModuleStore
from tailorlm.users.errors import UserError
from tailorlm.users.history import user_of
from tailorlm.users.keys import KeyOwner, key_hash
from tailorlm.users.service import UserService

log = logging.getLogger(__name__)


def served_specs(service: UserService, extra_kinds: tuple[str, ...]) -> list[ModuleSpec]:
    """One spec per distinct module layout among the users' current versions, plus the default spec of
    every kind asked for (a kind whose users share a trained part: the spec of the part the store keeps);
    LoRA's default when the store is empty. A kind whose shared part the store does not keep, or keeps
    for another spec, is refused (``UserError``): its modules would run through an untrained part."""
    store = service.store
    specs: list[ModuleSpec] = []
    found = [kinds.spec_from_dict(record.spec) for record in map(store.current, store.users()) if record]
    asked = [kinds.default_spec(name) for name in extra_kinds]
    asked = [service.collab_spec() or spec if kinds.of(spec).has_shared_part else spec for spec in asked]
    for spec in [*found, *asked]:
        if kinds.of(spec).has_shared_part:
            service.shared_part(spec)  # refused here, at start, rather than on a user's request
        if not any(kinds.same_layout(spec, known) for known in specs):
            specs.append(spec)
    return specs or [kinds.default_spec("lora")]


class StoredProfiles:
    """The PAG profiles the users' training wrote into the store (a server never writes one: that is a
    generation with the base model, the training worker's job)."""

    def __init__(self, service: UserService) -> None:
        self.service = service

    def ensure(self, users: Sequence[User]) -> None:
        for user in users:
            self.profile(user)

    def profile(self, user: User) -> UserProfile:
        found = self.service.profile(user.id)
        if found is None:
            raise ApiError(
                409,
                f"user `{user.id}` has no profile yet: it is written when their module is trained "
                "(tailorlm users train)",
                code="profile_missing",
            )
        return found


class TokenBuckets:
    """A token bucket per name: ``rate`` tokens per second, holding at most ``burst``. Names are keys'
    hashes or client addresses; the least recently seen are forgotten past ``max_names``, so a client
    with many addresses cannot grow the table without bound (a forgotten name starts with a full
    bucket)."""

    def __init__(self, rate: float, burst: float, max_names: int = 65_536) -> None:
        self.rate = rate
        self.burst = burst
        self.max_names = max_names
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # name -> (tokens, refilled)
        self._lock = threading.Lock()

    def _level(self, name: str, now: float) -> float:
        tokens, last = self._buckets.get(name, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def wait(self, name: str) -> float | None:
        """Seconds until ``name`` has a token, or None when it has one now (nothing is taken)."""
        with self._lock:
            tokens = self._level(name, time.monotonic())
        return None if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def take(self, name: str) -> float | None:
        """Take a token: None when there was one, else the seconds until there is (nothing taken)."""
        now = time.monotonic()
        with self._lock:
            tokens = self._level(name, now)
            taken = tokens >= 1.0
            self._buckets[name] = (tokens - 1.0 if taken else tokens, now)
            self._buckets.move_to_end(name)
            while len(self._buckets) > self.max_names:
                self._buckets.popitem(last=False)
        return None if taken else (1.0 - tokens) / self.rate


def rate_limited(rate: float, wait: float) -> ApiError:
    return ApiError(
        429,
        f"rate limit reached: {rate:g} requests per second per key",
        "rate_limit_error",
        code="rate_limit_exceeded",
        retry_after=wait,
    )


def auth_throttled(wait: float) -> ApiError:
    return ApiError(
        429,
        "too many requests with a missing or bad key from this address; wait before trying again",
        "rate_limit_error",
        code="auth_throttled",
        retry_after=wait,
    )


SchedulerFactory = Callable[["Server"], JobScheduler]  # a server's scheduler, made from its other parts


@dataclass(frozen=True)
class ServedStore:
    """A store as a server serves it: the users service over it, the base model its users trained on,
    and the module layouts served, one bank each, in this order in every engine serving the store (a job
    names its bank by index, so a front and its replicas agree on the index)."""

    service: UserService
    base_name: str | None
    specs: list[ModuleSpec]

    @classmethod
    def open(cls, config: ServeConfig) -> ServedStore:
        service = UserService(ModuleStore(config.store), device=config.device, dtype=config.dtype)
        base_name = config.base_model or service.settings().base_model
        return cls(service, base_name, served_specs(service, config.kinds))


class Server:
    """The part of a serving process that is the same whatever runs its jobs: the store and the users
    service, keys and rate limits, metrics, retraining jobs, and the label requests' prompts, over one
    ``JobScheduler`` (``scheduler``, which the ``scheduler`` factory makes once the rest is built).
    Alone, it is a front without an engine: the Ray front (``cluster.serving``) and the load tests'
    stock-PEFT baseline (``perf.serve``). ``LocalServer`` adds an engine in this process.

    ``served``: the store, opened (default: opened here). ``prompt_tokenizer``: the request threads' own
    tokenizer (default: the base model's, loaded by name). ``engines``: how many engines serve behind this
    front, each with ``config.slots`` slots per module layout (``capacity``). ``model_config``: the base
    model's transformers config (default: read by name), which bounds a label request's memory."""

    engine: Engine | None = None  # a local server's

    def __init__(
        self,
        config: ServeConfig,
        scheduler: SchedulerFactory,
        served: ServedStore | None = None,
        prompt_tokenizer: Any = None,
        engines: int = 1,
        model_config: Any = None,
    ) -> None:
        served = served or ServedStore.open(config)
        self.config = config
        self.service = served.service
        self.store = served.service.store
        self.specs = served.specs
        self.prompt_tokenizer = prompt_tokenizer or models.load_tokenizer(
            None if served.base_name == models.TINY_MODEL else served.base_name
        )
        # The base model's transformers config, read here, not on the event loop at a first label request.
        self.model_config = model_config or models.load_config(served.base_name)
        self.capacity = config.slots * len(self.specs) * engines  # resident modules in all
        self.metrics = ServeMetrics()
        # Requests per key (a user's two keys, and every admin key, each have their own bucket); failed
        # authentications per client address, checked before the key is looked up.
        self.limiter = (
            TokenBuckets(config.rate_limit, max(1.0, 2 * config.rate_limit)) if config.rate_limit else None
        )
        self.auth_failures = TokenBuckets(config.auth_failure_rate, config.auth_failure_burst)
        self.retrievers = RetrieverCache()
        self.recipe = recipe_from_name(config.recipe)  # label requests' recipe; None: prompts as sent
        self._builder: PromptBuilder | None = None  # label requests' prompts (``_prompt_builder``)
        self._builder_lock = threading.Lock()
        self._blend: BlendPart | None = None  # the store's blend part, read at the first request for it
        self.jobs = TrainingJobs(
            self.store.location,
            current=self._current_version,
            on_state=lambda state: self.metrics.training_jobs.labels(state).inc(),
            max_workers=config.training_workers,
            forgotten=lambda user_id: self.store.index.tombstone(user_id) is not None,
        )
        self.scheduler: JobScheduler = scheduler(self)
        self.url: str | None = None  # set once it answers (``run.answering``)

    def label_memory(self, prompt_tokens: int, count: int, width: int) -> int:
        """An upper bound, in bytes, of what scoring ``count`` labels of at most ``width`` tokens after a
        prompt of ``prompt_tokens`` takes on an engine behind this front (``engine.label_memory``): from
        the base model's config, in fp32, the widest dtype an engine serves in."""
        return label_memory(self.model_config, torch.float32, 1, prompt_tokens, count, width)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.jobs.stop()
        self.scheduler.stop()
        self.store.close()

    def forget_in_memory(self, user_id: str) -> int:
        """Drop all this process holds of a forgotten user: a retrain of theirs (stopped, its records
        dropped), every slot holding a version of their module (the scheduler resets each to the
        identity, here or on every replica), and the caches derived from history text (the retrievers
        cache by text, not by user, so all of them, and the label requests' prompt builder that holds
        one). Returns how many slots were cleared."""
        self.jobs.cancel_user(user_id)
        cleared = self.scheduler.forget(user_id)
        with self._builder_lock:
            self.retrievers = RetrieverCache()
            self._builder = None
        return cleared

    def _current_version(self, user_id: str) -> tuple[int, float] | None:
        record = self.store.current(user_id)
        return None if record is None else (record.version, record.created)

    # ---- users and their modules -------------------------------------------------------------------

    def owner(self, authorization: str | None, client: str) -> KeyOwner:
        """Whose key the request carries: 401 for none or a bad one, 429 when ``client`` (an address) has
        failed too often lately (then the key is not even looked up) or the key is over its rate. Blocks
        on the index: call it off the event loop."""
        wait = self.auth_failures.wait(client)
        if wait is not None:
            raise auth_throttled(wait)
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        found = self.service.resolve_key(token) if scheme.lower() == "bearer" else None
        if found is None:
            self.metrics.auth_failures.inc()
            self.auth_failures.take(client)
            raise invalid_key()
        if self.limiter is not None:
            wait = self.limiter.take(key_hash(token))
            if wait is not None:
                raise rate_limited(self.limiter.rate, wait)
        return found

    def module_of(self, owner: KeyOwner, model: str) -> tuple[int, int]:
        """(version, bank index) of the module ``model`` names, if ``owner`` may use it; the same 404
        for a model that is not theirs and one that does not exist."""
        if owner.role != "admin" and owner.user_id != model:
            raise model_not_found(model)
        record = self.store.current(model)
        if record is None:
            raise model_not_found(model)
        spec = kinds.spec_from_dict(record.spec)
        for index, served in enumerate(self.specs):
            if kinds.same_layout(served, spec):
                return record.version, index
        raise ApiError(
            400,
            f"the module of `{model}` ({record.kind}) has a layout this server was not started with; "
            "restart the server to serve it",
            code="model_not_servable",
            param="model",
        )

    def task_prompt(self, user_id: str, item: str) -> str | None:
        """``item`` as the benchmark asks it of ``user_id``: the store's task template under the server's
        recipe (retrieved history, shots), in the chat template; None when the server sends prompts as
        they are (recipe "none", or a store without a task)."""
        builder = self._prompt_builder()
        if builder is None:
            return None
        asked = Example(id="request", text=item, target="", targets=())
        return builder.build(self.service.data_user(user_id, builder.task), asked).text

    def _prompt_builder(self) -> PromptBuilder | None:
        """The label requests' prompt builder, made once (the store's task, the recipe, the retriever and
        the stored profiles do not change while serving); None while the store has no task yet (not kept:
        users imported later bring one)."""
        if self.recipe is None:
            return None
        with self._builder_lock:
            if self._builder is None:
                if self.service.settings().task is None:
                    return None
                recipe = self.recipe
                self._builder = PromptBuilder(
                    self.service.task(),
                    self.prompt_tokenizer,
                    recipe,
                    retriever=self.retrievers(recipe.retrieval) if recipe.retrieval else None,
                    profiles=StoredProfiles(self.service),
                )
            return self._builder

    def with_history(self, user_id: str, query: str) -> str | None:
        """The recipe's retrieval: the user's most relevant history items, as lines to put before the
        prompt (None when retrieval is off or the user has no history)."""
        if not self.config.retrieve:
            return None
        records = self.service.history(user_id)
        items = [HistoryItem(r.item_id, f"{r.input} -> {r.target}") for r in records]
        chosen = self.retrievers("bm25").top_k(query, items, self.config.retrieve)
        if not chosen:
            return None
        return "Earlier items of this user:\n" + "\n".join(f"- {item.text}" for item in chosen)

    # ---- the stacked blend -----------------------------------------------------------------------

    def blend_part(self, labels: Sequence[str]) -> BlendPart:
        """The store's blend part, for a label request that names an item with ``labels``: a 400 when the
        store keeps none or the labels are not the part's (in any order); a 500 when the part is damaged.
        Read once, at the first such request (a part imported later is read then; one replaced while
        serving, at the next start). Blocks on the store: call it off the event loop."""
        part = self._blend  # two first requests racing both read it: the same part, no lock needed
        if part is None:
            try:
                part = self.service.blend_part()
            except UserError as error:
                log.error("the store's blend part cannot be used: %s", error)
                raise ApiError(
                    500, f"the store's blend part cannot be used: {error}", "server_error"
                ) from None
            if part is None:
                raise ApiError(
                    400,
                    "this server's store keeps no blend part, so a request cannot name an item: import one "
                    "with `tailorlm users import ... --blend RUN/modules/blend-part-TAG`, or leave item out",
                    code="blend_unavailable",
                    param="item",
                )
            self._blend = part
        if sorted(labels) != sorted(part.labels):
            raise ApiError(
                400,
                f"a request that names an item is answered by the store's blend, whose labels are "
                f"{list(part.labels)}; send exactly those labels (in any order)",
                param="labels",
            )
        return part

    def blend_route(self, owner: KeyOwner, model: str, labels: Sequence[str]) -> tuple[BlendPart, int, int]:
        """(the store's blend part, version, bank) for a label request of ``model`` naming an item: the
        same 404 as ``module_of`` for a model that is not the owner's; then the part (``blend_part``); then
        the user's module when the part's model source is each user's own, else the shared model (bank -1,
        slot 0), which a user with no module of their own is served from too. Blocks on the store."""
        if owner.role != "admin" and owner.user_id != model:
            raise model_not_found(model)
        part = self.blend_part(labels)
        if part.model == "module":
            return (part, *self.module_of(owner, model))
        if not self.store.index.has_user(model):
            raise model_not_found(model)
        return part, 0, -1

    def blended(
        self,
        part: BlendPart,
        user_id: str,
        item: str,
        labels: Sequence[str],
        scores: Mapping[str, float] | None,
    ) -> tuple[str, dict[str, float]]:
        """The blend's answer for ``user_id`` on ``item``: the label the task's rule picks from the blended
        distribution, and every label's blended log-probability in ``labels``' order. ``scores``: the
        model's label scores (None for a part without a model source). The user's row is folded in from
        the training history the store keeps for them now. Blocks on the index: call it off the event
        loop."""
        model = None
        if part.uses_model:
            if scores is None:
                raise ValueError("this blend part has a model source: the model's label scores are needed")
            model = torch.log_softmax(torch.tensor([scores[label] for label in part.labels]), dim=-1)
        row = part.statistics.row(user_of(user_id, self.service.history(user_id)).train)
        found = part.distribution(row, item, model)
        answer = label_by_rule(part.rule, part.labels, found.exp().tolist())
        by_label = dict(zip(part.labels, found.tolist(), strict=True))
        return answer, {label: by_label[label] for label in labels}


def module_loader(store: ModuleStore, spec: ModuleSpec) -> Callable[[str], Mapping[str, torch.Tensor]]:
    """How the slot manager of a bank of ``spec``'s layout reads the module a slot key names."""

    def load(key: str) -> Mapping[str, torch.Tensor]:
        user_id, version = key_user(key)
        stored = store.get(user_id, version)  # checks the sha256 the index holds
        if not kinds.same_layout(stored.spec, spec):
            raise ModuleFileError(
                f"user {user_id!r} version {version} does not fit the bank it was routed to"
            )
        return kinds.of(spec).normalize_names(stored.tensors)

    return load


def engine_scheduler(server: LocalServer) -> Scheduler:
    """tailorlm's continuous-batching scheduler over a local server's engine and slots."""
    return Scheduler(server.engine, server.managers, server.config.scheduler, server.metrics)


class LocalServer(Server):
    """A server whose jobs run in this process: the base model (with the store's task adapter merged), an
    engine with a bank per served module layout, a slot manager per bank loading modules from the store
    on demand, and the scheduler the ``scheduler`` factory makes over them (tailorlm's own by default;
    the load tests' bare-base upper bound is another, ``perf.serve``). A thread sweeps out of memory the
    users another process forgot. ``tailorlm serve`` runs one, and so does each Ray replica."""

    def __init__(
        self,
        config: ServeConfig,
        base: models.BaseModel | None = None,
        scheduler: Callable[[LocalServer], JobScheduler] = engine_scheduler,
    ) -> None:
        served = ServedStore.open(config)
        # The store's users trained on the base with its task adapter merged (OPPU): so are they served.
        self.base = served.service.with_task_adapter(
            base or models.load_base(served.base_name, config.device, config.dtype)
        )
        self.engine = Engine(self.base, served.specs, slots=config.slots + 1, max_length=config.max_context)
        for bank in self.engine.banks:  # the trained part its users share, checked when the store opened
            if kinds.of(bank.spec).has_shared_part:
                try:
                    bank.write_shared(served.service.shared_part(bank.spec))
                except EngineError as error:  # a part trained over another base model
                    raise UserError(
                        f"the store's {bank.spec.kind} part does not fit base model {self.base.name}: {error}"
                    ) from None
        self.managers = [
            SlotManager(bank, module_loader(served.service.store, bank.spec)) for bank in self.engine.banks
        ]
        self._stopping = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="tailorlm-forget-sweep", daemon=True)
        # The request threads' own tokenizer: a fast tokenizer's settings are not safe to share with the
        # scheduler thread, whose scoring truncates (a shared one can fail with "Already borrowed").
        super().__init__(
            config,
            scheduler,
            served,
            prompt_tokenizer=copy.deepcopy(self.base.tokenizer),
            model_config=self.base.model.config,
        )

    def label_memory(self, prompt_tokens: int, count: int, width: int) -> int:
        return self.engine.label_memory(1, prompt_tokens, count, width)

    def start(self) -> None:
        super().start()
        self._sweeper.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._sweeper.is_alive():
            self._sweeper.join(timeout=10)
        super().stop()

    def _sweep(self) -> None:
        """Forget in memory the users another process forgot (``tailorlm users delete`` beside a running
        server): every ``forget_sweep_seconds``, a resident module whose user no longer exists goes."""
        while not self._stopping.wait(self.config.forget_sweep_seconds):
            resident = {key_user(key)[0] for manager in self.managers for key in manager.resident()}
            try:
                gone = [user_id for user_id in resident if not self.store.index.has_user(user_id)]
            except StoreLocationError as error:  # the index is down: try again at the next sweep
                log.warning("could not check resident users against the index: %s", error)
                continue
            for user_id in gone:
                try:
                    self.forget_in_memory(user_id)
                except Exception:  # e.g. the scheduler stopping under it; the next sweep tries again
                    log.exception("forgetting %r in memory failed", user_id)
