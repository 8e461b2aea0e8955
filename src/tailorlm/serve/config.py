"""What a server is: where its users live, which recipe it applies, and its limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tailorlm.methods.recipes import Recipe
from tailorlm.serve.scheduler import SchedulerConfig

RECIPE_PARTS = ("plain", "bm25", "dense", "shots", "profile")


def recipe_from_name(name: str) -> Recipe | None:
    """``"bm25+shots"`` -> the benchmark's ``Recipe``; ``"none"`` -> None (prompts as sent)."""
    if name == "none":
        return None
    parts = name.split("+")
    unknown = [part for part in parts if part not in RECIPE_PARTS]
    if unknown or not parts:
        raise ValueError(
            f"unknown recipe part(s) {unknown} in {name!r}; use none or {', '.join(RECIPE_PARTS)} joined by +"
        )
    retrieval = [part for part in parts if part in ("bm25", "dense")]
    if len(retrieval) > 1:
        raise ValueError(f"recipe {name!r} names two retrievers")
    return Recipe(
        shots="shots" in parts, retrieval=retrieval[0] if retrieval else None, profile="profile" in parts
    )


LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServeConfig:
    store: str | Path  # the store's root: a folder or an fsspec URL
    host: str = LOOPBACK
    port: int = 8000
    base_model: str | None = None  # None: the store's recorded base model, else the default
    device: str | None = None
    dtype: str | None = None
    kinds: tuple[str, ...] = ()  # kinds served besides those already in the store (default specs)
    slots: int = 16  # resident modules per kind (memory is bounded by this, not by the user count)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_context: int = 2048  # prompt tokens plus new tokens
    max_body_bytes: int = 1 << 20
    rate_limit: float | None = None  # requests per second per key (bursts of twice that); None: no limit
    # Requests with a missing or bad key, per client address: this many per second, bursts of
    # ``auth_failure_burst``; beyond, the address gets 429 before any key is looked up.
    auth_failure_rate: float = 1.0
    auth_failure_burst: float = 20.0
    # Connections (see ``serve.connections``): seconds a client has to send a request's headers, and its
    # whole body; seconds an idle keep-alive connection stays open; connections held at once, in all and
    # per client address (beyond, a new connection is closed at once).
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive: float = 5.0
    max_connections: int = 512
    max_connections_per_client: int = 64
    # A request whose worst-case working memory (label scoring, ``Engine.label_memory``) is above this
    # many bytes is refused with a 400 before any work.
    max_request_bytes: int = 1 << 30
    retrieve: int = 0  # free-form prompts: this many of the user's history items put before the prompt
    # Label requests: the prompt is the task's item, written into the benchmark's prompt for the store's
    # task under this recipe ("plain", "bm25", "dense", "shots", "profile" (PAG: the profile the user's
    # training wrote), or joined with "+"); "none": as sent.
    recipe: str = "plain"
    retrain: bool = True  # POST .../history retrains the user in a worker process
    # How often the server looks for users another process forgot, to drop their modules from memory.
    forget_sweep_seconds: float = 5.0
    training_workers: int = 1  # worker processes at once (each loads a base model); others queue

    def __post_init__(self) -> None:
        if self.slots < 2:
            raise ValueError(f"a server needs at least 2 slots per kind, not {self.slots}")
        if self.max_context < 8:
            raise ValueError(f"max_context {self.max_context} is too small")
        if self.rate_limit is not None and not self.rate_limit > 0:
            raise ValueError("rate_limit must be positive (or None for no limit)")
        if not (self.auth_failure_rate > 0 and self.auth_failure_burst >= 1):
            raise ValueError("auth_failure_rate must be positive and auth_failure_burst at least 1")
        for name in ("header_timeout", "body_timeout", "keep_alive", "forget_sweep_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        if not 1 <= self.max_connections_per_client <= self.max_connections:
            raise ValueError("max_connections_per_client must be between 1 and max_connections")
        if self.max_request_bytes < 1 << 20:
            raise ValueError("max_request_bytes must be at least 1 MiB")
        recipe_from_name(self.recipe)  # a bad name fails here, not at the first request
        if self.training_workers < 1:
            raise ValueError("training_workers must be at least 1")
        if self.retrieve < 0:
            raise ValueError("retrieve must be 0 (off) or a number of history items")
