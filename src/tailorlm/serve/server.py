"""The serving process's parts, built from a ``ServeConfig``: one base model, an engine with a bank per
module spec in the store (a batch mixes users of every kind), a slot manager per bank loading modules
from the store on demand, the scheduler thread, and the retraining jobs."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch

from tailorlm import kinds, models
from tailorlm.data.schema import Example, HistoryItem, User
from tailorlm.engine.engine import Engine
from tailorlm.engine.slots import SlotManager
from tailorlm.kinds import ModuleSpec
from tailorlm.methods.profiles import UserProfile
from tailorlm.methods.recipes import PromptBuilder
from tailorlm.methods.retrieval import RetrieverCache
from tailorlm.serve.config import ServeConfig, recipe_from_name
from tailorlm.serve.metrics import ServeMetrics
from tailorlm.serve.protocol import ApiError, invalid_key, model_not_found
from tailorlm.serve.scheduler import Scheduler, key_user
from tailorlm.serve.training import TrainingJobs
from tailorlm.store.index_backends import StoreLocationError
from tailorlm.store.module_folder import ModuleFileError
from tailorlm.store.store import ModuleStore
from tailorlm.users.keys import KeyOwner, key_hash
from tailorlm.users.service import UserService

log = logging.getLogger(__name__)


def served_specs(store: ModuleStore, extra_kinds: tuple[str, ...]) -> list[ModuleSpec]:
    """One spec per distinct module layout among the users' current versions, plus the default spec of
    every kind asked for; LoRA's default when the store is empty."""
    specs: list[ModuleSpec] = []
    found = [kinds.spec_from_dict(record.spec) for record in map(store.current, store.users()) if record]
    for spec in [*found, *(kinds.default_spec(name) for name in extra_kinds)]:
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


class Server:
    def __init__(
        self,
        config: ServeConfig,
        base: models.BaseModel | None = None,
        scheduler_factory: Callable[[Server], Scheduler] | None = None,
        bare: bool = False,
        replicas: int = 0,
    ) -> None:
        """``scheduler_factory`` and ``bare`` are for load tests: another scheduler behind the same HTTP
        front (a stock-PEFT baseline), or every request on the bare base model (the upper bound).
        ``replicas`` > 0: this process is only the HTTP front of that many engine replicas elsewhere
        (``cluster.serving``): no base model or engine here, and ``scheduler_factory`` routes each job
        to a replica."""
        self.config = config
        self.store = ModuleStore(config.store)
        self.service = UserService(self.store, device=config.device, dtype=config.dtype)
        base_name = config.base_model or self.service.settings().base_model
        # One bank per module layout, in this order, in every engine serving this store: a job names its
        # bank by index, so a front and its replicas agree on the index.
        self.specs = served_specs(self.store, config.kinds)
        self.engine: Engine | None = None
        self.managers: list[SlotManager] = []
        if replicas:
            self.base = None
            self.prompt_tokenizer = models.load_tokenizer(
                None if base_name == models.TINY_MODEL else base_name
            )
        else:
            # The store's users trained on the base with its task adapter merged (OPPU): so are they served.
            self.base = self.service.with_task_adapter(
                base or models.load_base(base_name, config.device, config.dtype)
            )
            # The request threads' own tokenizer: a fast tokenizer's settings are not safe to share with
            # the scheduler thread, whose scoring truncates (a shared one can fail with "Already borrowed").
            self.prompt_tokenizer = copy.deepcopy(self.base.tokenizer)
            self.engine = Engine(self.base, self.specs, slots=config.slots + 1, max_length=config.max_context)
            self.managers = [SlotManager(bank, self._loader(bank.spec)) for bank in self.engine.banks]
        self.capacity = config.slots * len(self.specs) * max(1, replicas)  # resident modules in all
        self.metrics = ServeMetrics()
        self.bare = bare
        if scheduler_factory is None and replicas:
            raise ValueError("a front of remote replicas needs the scheduler that routes to them")
        self.scheduler = (
            scheduler_factory(self)
            if scheduler_factory
            else Scheduler(self.engine, self.managers, config.scheduler, self.metrics)
        )
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
        self._stopping = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="tailorlm-forget-sweep", daemon=True)
        self.jobs = TrainingJobs(
            self.store.location,
            current=self._current_version,
            on_state=lambda state: self.metrics.training_jobs.labels(state).inc(),
            max_workers=config.training_workers,
            forgotten=lambda user_id: self.store.index.tombstone(user_id) is not None,
        )
        self.url: str | None = None  # set once it answers (run.background)

    def start(self) -> None:
        self.scheduler.start()
        if self.managers:  # a front of remote replicas holds no module: its replicas sweep their own
            self._sweeper.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._sweeper.is_alive():
            self._sweeper.join(timeout=10)
        self.jobs.stop()
        self.scheduler.stop()
        self.store.close()

    def forget_in_memory(self, user_id: str) -> int:
        """Drop all this process holds of a forgotten user: a retrain of theirs (stopped, its records
        dropped), every slot holding a version of their module (reset to the identity), and the caches
        derived from history text (the retrievers cache by text, not by user, so all of them, and the
        label requests' prompt builder that holds one). Returns how many slots were cleared."""
        self.jobs.cancel_user(user_id)
        cleared = self.scheduler.forget(user_id)
        with self._builder_lock:
            self.retrievers = RetrieverCache()
            self._builder = None
        return cleared

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

    def _current_version(self, user_id: str) -> tuple[int, float] | None:
        record = self.store.current(user_id)
        return None if record is None else (record.version, record.created)

    # ---- users and their modules -------------------------------------------------------------------

    def _loader(self, spec: ModuleSpec):
        def load(key: str) -> Mapping[str, torch.Tensor]:
            user_id, version = key_user(key)
            stored = self.store.get(user_id, version)  # checks the sha256 the index holds
            if not kinds.same_layout(stored.spec, spec):
                raise ModuleFileError(
                    f"user {user_id!r} version {version} does not fit the bank it was routed to"
                )
            return kinds.of(spec).normalize_names(stored.tensors)

        return load

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
        if self.bare:
            return record.version, -1
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
