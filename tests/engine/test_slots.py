"""SlotManager: the one owner of which user sits in which slot. Free slots first, then the least recently
used unpinned user makes room; pinned slots are never taken; a user who leaves leaves the identity behind;
misses come in through the loader."""

from __future__ import annotations

import threading

import pytest
import torch

from kind_helpers import ALL_KINDS
from tailorlm.engine.bank import EngineError, SlotBank
from tailorlm.engine.slots import SlotManager, SlotsFullError


def _modules(bank: SlotBank, users: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Distinct non-identity modules per user (drawn through slot 1, which is left as the identity)."""
    made = {}
    for index, user in enumerate(users, start=1):
        bank.reset(1, torch.Generator().manual_seed(100 + index))
        made[user] = {name: value + index for name, value in bank.read(1).items()}
    bank.clear(1)
    return made


def _holds(bank: SlotBank, slot: int, module: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(value, module[name]) for name, value in bank.read(slot).items())


@pytest.fixture
def bank(make_engine) -> SlotBank:
    """A bank with 3 user slots."""
    return make_engine("lora", slots=4).bank


def test_free_slots_are_handed_out_in_order(bank):
    modules = _modules(bank, ["a", "b", "c"])
    manager = SlotManager(bank)
    assert manager.capacity == 3
    assert [manager.place(user, modules[user]) for user in "abc"] == [1, 2, 3]
    assert (
        manager.resident() == ["a", "b", "c"] and manager.slot_of("b") == 2 and manager.slot_of("z") is None
    )
    assert all(_holds(bank, manager.slot_of(u), modules[u]) for u in "abc")
    assert manager.evictions == 0
    # Placing a resident user again replaces their module in the slot they already have.
    assert manager.place("b", modules["c"]) == 2 and _holds(bank, 2, modules["c"])


def test_the_least_recently_used_user_makes_room(bank):
    modules = _modules(bank, ["a", "b", "c", "d", "e"])
    manager = SlotManager(bank, loader=modules.__getitem__)
    for user in "abc":
        manager.place(user, modules[user])
    manager.acquire(["a"])  # a is used again: b is now the least recently used
    slot_of_b = manager.slot_of("b")
    assert manager.place("d", modules["d"]) == slot_of_b
    assert manager.resident() == ["c", "a", "d"] and manager.evictions == 1
    assert _holds(bank, slot_of_b, modules["d"])
    manager.acquire(["e"])  # a miss evicts too: c is next
    assert manager.resident() == ["a", "d", "e"] and manager.evictions == 2


def test_a_pinned_user_is_never_evicted(bank):
    modules = _modules(bank, ["a", "b", "c", "d", "e"])
    manager = SlotManager(bank)
    for user in "abc":
        manager.place(user, modules[user])
    with manager.pinned_slots([manager.slot_of("a")]):  # a is the least recently used, but in use
        manager.place("d", modules["d"])
        assert "a" in manager.resident() and "b" not in manager.resident()
        with pytest.raises(EngineError, match="in use by an in-flight batch"):
            manager.evict("a")
    manager.place("e", modules["e"])  # unpinned again, a is the one to go
    assert "a" not in manager.resident()


def test_a_bank_full_of_pinned_users_raises_and_changes_nothing(bank):
    modules = _modules(bank, ["a", "b", "c", "d"])
    manager = SlotManager(bank, loader=modules.__getitem__)
    with manager.pinned(["a", "b"]), manager.pinned_slots([manager.place("c", modules["c"])]):
        with pytest.raises(SlotsFullError, match="all 3 user slots are pinned"):
            manager.place("d", modules["d"])
        with pytest.raises(SlotsFullError):
            manager.acquire(["d"])
        assert manager.resident() == ["a", "b", "c"]
        assert all(_holds(bank, manager.slot_of(u), modules[u]) for u in "abc")
    manager.place("d", modules["d"])  # every pin released: room again
    assert manager.resident() == ["b", "c", "d"]


def test_nested_pins_hold_until_the_last_one_ends(bank):
    modules = _modules(bank, ["a", "b", "c", "d"])
    manager = SlotManager(bank)
    for user in "abc":
        manager.place(user, modules[user])
    slot = manager.slot_of("a")
    with manager.pinned_slots([slot]):
        with manager.pinned_slots([slot]):
            pass
        manager.place("d", modules["d"])
        assert "a" in manager.resident()
    manager.evict("a")
    assert "a" not in manager.resident()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_a_user_who_leaves_leaves_the_identity(kind, make_engine):
    bank = make_engine(kind, slots=3).bank
    modules = _modules(bank, ["a", "b"])
    manager = SlotManager(bank)
    slot = manager.place("a", modules["a"])
    fresh = manager.place("b", generator=torch.Generator().manual_seed(0))
    assert not bank.is_identity(slot)
    manager.evict("a")
    assert bank.is_identity(slot) and manager.slot_of("a") is None
    manager.evict("a")  # not resident: nothing to do
    manager.evict("b")
    assert bank.is_identity(fresh) and manager.resident() == []
    # A module that does not fit is refused, and the user it was meant for is gone, not half there.
    slot = manager.place("a", modules["a"])
    broken = {name: value.flatten()[:1] for name, value in modules["b"].items()}
    with pytest.raises(EngineError, match="has shape"):
        manager.place("a", broken)
    assert manager.slot_of("a") is None and bank.is_identity(slot)
    assert sorted([manager.place("a", modules["a"]), manager.place("b", modules["b"])]) == [1, 2]


def test_misses_load_through_the_loader_and_are_counted(bank):
    modules = _modules(bank, ["a", "b", "c"])
    loaded: list[str] = []

    def loader(user_id: str) -> dict[str, torch.Tensor]:
        loaded.append(user_id)
        return modules[user_id]

    manager = SlotManager(bank, loader=loader)
    placed = manager.acquire(["a", "b", "a"])
    assert loaded == ["a", "b"] and (manager.hits, manager.misses) == (0, 2)
    assert set(placed) == {"a", "b"} and all(_holds(bank, placed[u], modules[u]) for u in placed)
    again = manager.acquire(["b", "c"])
    assert loaded == ["a", "b", "c"] and (manager.hits, manager.misses) == (1, 3)
    assert again["b"] == placed["b"]
    with pytest.raises(EngineError, match="no loader was given"):
        SlotManager(bank).acquire(["a"])


def test_one_acquire_never_evicts_its_own_users(bank):
    modules = _modules(bank, ["a", "b", "c", "x", "y", "z"])
    manager = SlotManager(bank, loader=modules.__getitem__)
    manager.acquire(["x", "y", "z"])
    placed = manager.acquire(["a", "b", "c"])  # each miss evicts one of x, y, z, never a or b
    assert sorted(manager.resident()) == ["a", "b", "c"]
    assert all(_holds(bank, placed[u], modules[u]) for u in "abc")


def test_more_distinct_users_than_slots_is_refused(bank):
    modules = _modules(bank, ["a", "b", "c", "d"])
    manager = SlotManager(bank, loader=modules.__getitem__)
    with pytest.raises(SlotsFullError, match="4 distinct users in one batch, but the bank has 3 slots"):
        manager.acquire(["a", "b", "c", "d"])
    assert manager.resident() == [] and manager.misses == 0
    assert sorted(manager.acquire(["a", "b", "c", "a"])) == ["a", "b", "c"]


def test_place_needs_exactly_one_source(bank):
    manager = SlotManager(bank)
    module = _modules(bank, ["a"])["a"]
    with pytest.raises(EngineError, match="either their tensors or a generator"):
        manager.place("a")
    with pytest.raises(EngineError, match="either their tensors or a generator"):
        manager.place("a", module, generator=torch.Generator())
    assert manager.resident() == []


def test_a_new_version_of_a_pinned_user_goes_to_another_slot(make_engine):
    """A batch that started on a user's old module finishes on it; the new module serves what comes
    after, and the old slot is reset and freed when that batch lets go."""
    engine = make_engine("lora", slots=4)
    manager = SlotManager(engine.bank)
    generator = torch.Generator().manual_seed(0)
    old = manager.place("ann", generator=generator)
    old_tensors = engine.bank.read(old)
    with manager.pinned(["ann"]) as placed:
        assert placed["ann"] == old
        new = manager.place("ann", generator=generator)
        assert new != old and manager.slot_of("ann") == new
        for name, value in engine.bank.read(old).items():
            assert torch.equal(value, old_tensors[name])  # the running batch still sees the old module
    assert engine.bank.is_identity(old) and manager.resident() == ["ann"]
    assert manager.place("bob", generator=generator) == old  # the freed slot is handed out again


def test_threads_sharing_a_manager_never_share_a_slot(make_engine):
    engine = make_engine("lora", slots=5)  # 4 user slots: two threads pinning two users each fill them
    engine.bank.reset(1, torch.Generator().manual_seed(1))
    module = engine.bank.read(1)
    engine.bank.clear(1)
    manager = SlotManager(engine.bank, loader=lambda user_id: module)
    errors = []

    def worker(index: int) -> None:
        for round_index in range(30):
            users = [f"u{(index * 7 + round_index + k) % 9}" for k in range(2)]
            try:
                with manager.pinned(users) as placed:
                    assert len(set(placed.values())) == len(placed)
                    resident = {u: manager.slot_of(u) for u in users}
                    assert resident == placed  # nobody evicted a pinned user meanwhile
            except Exception as error:
                errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    slots = [manager.slot_of(u) for u in manager.resident()]
    assert len(slots) == len(set(slots)) <= manager.capacity
    assert manager.hits + manager.misses == 2 * 30 * 2
