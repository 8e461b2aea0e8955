"""Which user sits in which slot: the one owner of that mapping.

A bank has ``slots - 1`` user slots (slot 0 is the identity). The manager hands a user a free slot, or
evicts the least recently used user that no in-flight batch has pinned; a pinned slot is never evicted,
so a batch keeps the modules it started with. A user who is not resident is brought in by ``loader``
(the module store's, for serving and answering) or placed with given tensors (training); a user that
leaves has their slot reset to the identity, so nothing of them stays in memory.

Memory is bounded by the slot count, never by the number of users.

Thread-safe: one lock guards the mapping, so a server's request threads and its scheduler can share a
manager. Replacing a user who is pinned (a new version while a batch still runs on the old one) puts the
new module in another slot; the old slot keeps its tensors until its last batch lets go, then it is reset
and freed.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from tailorlm.engine.bank import EngineError, SlotBank

ModuleLoader = Callable[[str], Mapping[str, torch.Tensor]]


class SlotsFullError(EngineError):
    """Every user slot is pinned by an in-flight batch: nothing can be evicted to make room."""


class SlotManager:
    def __init__(self, bank: SlotBank, loader: ModuleLoader | None = None) -> None:
        self.bank = bank
        self.loader = loader
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._free = list(range(bank.slots - 1, 0, -1))  # pop() hands out 1, 2, 3, ...
        self._pins: dict[int, int] = {}  # slot -> how many in-flight batches use it
        self._retired: set[int] = set()  # pinned slots whose user moved on: freed at their last unpin
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def capacity(self) -> int:
        return self.bank.slots - 1

    def pins(self) -> int:
        """How many pins are held in all (0 once every in-flight batch has finished)."""
        with self._lock:
            return sum(self._pins.values())

    def resident(self) -> list[str]:
        """Resident users, least recently used first."""
        with self._lock:
            return list(self._slot_of)

    def slot_of(self, user_id: str) -> int | None:
        with self._lock:
            return self._slot_of.get(user_id)

    # ---- bringing users in -------------------------------------------------------------------------

    def place(
        self,
        user_id: str,
        tensors: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> int:
        """Give ``user_id`` a slot holding ``tensors`` (or, with ``generator``, a fresh user's initial
        values), replacing whatever that user had resident. Returns the slot."""
        if (tensors is None) == (generator is None):
            raise EngineError("place a user with either their tensors or a generator for fresh values")
        with self._lock:
            slot = self._slot_of.get(user_id)
            if slot is not None and slot in self._pins:
                # A batch still runs on this user's module: the new one goes elsewhere.
                self._slot_of.pop(user_id)
                self._retired.add(slot)
                slot = None
            if slot is None:
                slot = self._take_slot()
            try:
                if tensors is not None:
                    self.bank.write(slot, tensors)
                else:
                    self.bank.reset(slot, generator)
            except Exception:
                self._drop(user_id, slot)
                raise
            self._slot_of[user_id] = slot
            self._slot_of.move_to_end(user_id)
            return slot

    def acquire(self, user_ids: Sequence[str]) -> dict[str, int]:
        """Make every user resident (loading misses through ``loader``) and mark them used now."""
        placed = self._acquire(user_ids)
        with self._lock:
            for slot in placed.values():
                self._unpin(slot)
        return placed

    def _acquire(self, user_ids: Sequence[str]) -> dict[str, int]:
        """``acquire``, returning with every placed slot pinned once (the caller unpins)."""
        if len(set(user_ids)) > self.capacity:
            raise SlotsFullError(
                f"{len(set(user_ids))} distinct users in one batch, but the bank has {self.capacity} slots"
            )
        placed: dict[str, int] = {}
        with self._lock:
            try:
                for user_id in dict.fromkeys(user_ids):
                    slot = self._slot_of.get(user_id)
                    if slot is not None:
                        self.hits += 1
                        self._slot_of.move_to_end(user_id)
                    else:
                        if self.loader is None:
                            raise EngineError(f"user {user_id!r} is not resident and no loader was given")
                        self.misses += 1
                        slot = self.place(user_id, self.loader(user_id))
                    placed[user_id] = slot
                    self._pin(slot)  # users placed earlier in this call must not be evicted by later ones
            except BaseException:
                for slot in placed.values():
                    self._unpin(slot)
                raise
        return placed

    @contextlib.contextmanager
    def pinned(self, user_ids: Sequence[str]) -> Iterator[dict[str, int]]:
        """Acquire the users and keep their slots from eviction until the block ends (an in-flight
        batch). Acquiring and pinning are one step: no other thread can evict a user in between."""
        placed = self._acquire(user_ids)
        try:
            yield placed
        finally:
            with self._lock:
                for slot in placed.values():
                    self._unpin(slot)

    @contextlib.contextmanager
    def pinned_slots(self, slots: Sequence[int]) -> Iterator[None]:
        """Keep ``slots`` from eviction until the block ends."""
        held = list(slots)
        with self._lock:
            for slot in held:
                self._pin(slot)
        try:
            yield
        finally:
            with self._lock:
                for slot in held:
                    self._unpin(slot)

    def _pin(self, slot: int) -> None:
        self._pins[slot] = self._pins.get(slot, 0) + 1

    def _unpin(self, slot: int) -> None:
        self._pins[slot] -= 1
        if not self._pins[slot]:
            del self._pins[slot]
            if slot in self._retired:  # its user moved to another slot while this one was in use
                self._retired.discard(slot)
                self.bank.clear(slot)
                self._free.append(slot)

    # ---- letting users go --------------------------------------------------------------------------

    def evict(self, user_id: str) -> None:
        """Take ``user_id`` out of memory: their slot becomes the identity and free again."""
        with self._lock:
            slot = self._slot_of.get(user_id)
            if slot is None:
                return
            if slot in self._pins:
                raise EngineError(f"user {user_id!r} is in use by an in-flight batch and cannot be evicted")
            self._drop(user_id, slot)

    def _drop(self, user_id: str, slot: int) -> None:
        self._slot_of.pop(user_id, None)
        self.bank.clear(slot)
        if slot not in self._free:
            self._free.append(slot)

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        for user_id, slot in self._slot_of.items():  # least recently used first
            if slot not in self._pins:
                self.evictions += 1
                self._drop(user_id, slot)
                return self._free.pop()
        raise SlotsFullError(f"all {self.capacity} user slots are pinned by in-flight batches")
