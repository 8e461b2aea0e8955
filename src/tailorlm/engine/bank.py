"""The slot bank: every resident user's tensors stacked per site, and the layers that read them. Each row
of a batch carries a slot index; an adapted layer hands its kind the whole stack and the rows' slot ids,
and the kind adds each row's term to one shared base matmul, so the number of resident users costs
memory, not time. Nothing here knows which kind it holds: that is the kind's file (``tailorlm.kinds``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from tailorlm import kinds
from tailorlm.kinds import ModuleKind, ModuleSpec, ModuleSpecError
from tailorlm.kinds.kind import base_linear

MODULE_DTYPE = torch.float32  # every user's tensors in the bank, whatever the base's dtype


class EngineError(RuntimeError):
    """A misuse of the engine: wrong slot, wrong module layout, a base model already wrapped."""


class SlotRouter:
    """The current batch's slot index per row, shared by every adapted layer of one model."""

    def __init__(self) -> None:
        self.slot_ids: torch.Tensor | None = None
        self.only_identity = True

    @contextlib.contextmanager
    def route(self, slot_ids: torch.Tensor) -> Iterator[None]:
        previous = (self.slot_ids, self.only_identity)
        self.slot_ids = slot_ids
        self.only_identity = not bool(slot_ids.any())
        try:
            yield
        finally:
            self.slot_ids, self.only_identity = previous


class SlotLinear(nn.Module):
    """A frozen base projection plus, per row, the term of that row's user."""

    def __init__(
        self,
        base: nn.Linear,
        short_name: str,
        spec: ModuleSpec,
        router: SlotRouter,
        stack: dict[str, nn.Parameter],
    ) -> None:
        super().__init__()
        self.base = base
        self.short_name = short_name
        self.spec = spec
        self.kind = kinds.of(spec)
        self.router = router
        # Deliberately not registered as parameters: the bank owns them, and the wrapped model's own
        # parameter walks (dtype, device, state_dict) should keep seeing only the base weights.
        self.stack = stack  # suffix -> [slots, ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot_ids = self.router.slot_ids
        if slot_ids is None:
            raise EngineError("a slot-adapted layer ran outside Engine: no slot ids were set for the batch")
        if self.router.only_identity:
            return self.base(x)
        if x.shape[0] != slot_ids.shape[0]:
            raise EngineError(f"batch has {x.shape[0]} rows but {slot_ids.shape[0]} slot ids")
        return self.kind.apply_linear(
            self.spec, self.short_name, self.base, x, self.stack, slot_ids, self.training
        )


class SlotBank:
    """All slots' tensors for one module spec on one model. Slot 0 is the identity (no module)."""

    def __init__(
        self,
        model: nn.Module,
        spec: ModuleSpec,
        slots: int,
        router: SlotRouter,
        siblings: Sequence[SlotRouter] = (),
    ) -> None:
        """``siblings``: the routers of banks already on ``model`` under the same engine (one bank per
        kind of a multi-kind engine). Their layers are wrapped again, so a projection adapted by two
        banks adds both terms; for any row at most one of them is not the identity."""
        if slots < 2:
            raise EngineError("a slot bank needs at least 2 slots: slot 0 is reserved for 'no module'")
        if any(isinstance(m, SlotLinear) and m.router not in siblings for m in model.modules()):
            raise EngineError(
                "this base model already carries slot layers; load a fresh base model for each "
                "engine (wrapping twice would stack two users' terms)"
            )
        self.spec = kinds.validate(spec)
        self.kind: ModuleKind = kinds.of(spec)
        self.slots = slots
        # Users' tensors are fp32 whatever the base computes in (mixed precision: a bf16 base, fp32
        # modules and optimizer state, as PEFT keeps adapters): Adam's small steps vanish in bf16's 8
        # mantissa bits. The kinds compute their terms in fp32 and hand back the base's dtype.
        self.dtype, self.device = MODULE_DTYPE, next(model.parameters()).device
        self.tensors: dict[str, nn.Parameter] = {}  # bank name (= key on disk) -> [slots, ...]
        self.layers: list[SlotLinear] = []
        self._suffix: dict[str, str] = {}
        for name, shape in self.kind.input_shapes(spec, model).items():
            self._add(name, name, shape)
        # Tensors every user shares (``ModuleKind.shared_shapes``): no slot axis, not part of any user's
        # module; seeded alike in every bank of the spec until the task's training writes them.
        self.shared: dict[str, nn.Parameter] = {}
        generator = torch.Generator().manual_seed(0)
        for name, shape in self.kind.shared_shapes(spec, model).items():
            fresh = torch.empty(shape, dtype=torch.float32)
            self.kind.init_shared(name, fresh, generator)
            self.shared[name] = nn.Parameter(fresh.to(self.device), requires_grad=False)
        self.input_stack = {
            **{name: self.tensors[name] for name in self.kind.input_shapes(spec, model)},
            **self.shared,
        }
        for name, shape in self.kind.label_shapes(spec).items():
            self._add(name, name, shape)
        self.label_stack = {name: self.tensors[name] for name in self.kind.label_shapes(spec)}
        self._wrap_linears(model, router)

    def _add(self, name: str, suffix: str, shape: tuple[int, ...]) -> nn.Parameter:
        identity = self.kind.identity_value(suffix)
        tensor = nn.Parameter(
            torch.full((self.slots, *shape), identity, dtype=self.dtype, device=self.device),
            requires_grad=False,
        )
        self.tensors[name] = tensor
        self._suffix[name] = suffix
        return tensor

    def _wrap_linears(self, model: nn.Module, router: SlotRouter) -> None:
        targets = set(self.kind.targets(self.spec))
        found: set[str] = set()
        for path, module in list(model.named_modules()):
            short_name = path.rsplit(".", 1)[-1]
            if short_name not in targets or not isinstance(module, (nn.Linear, SlotLinear)):
                continue
            shapes = self.kind.linear_shapes(self.spec, short_name, base_linear(model, path))
            own = {
                suffix: self._add(self.kind.tensor_name(self.spec, path, suffix), suffix, shape)
                for suffix, shape in shapes.items()
            }
            layer = SlotLinear(module, short_name, self.spec, router, own)
            _replace_submodule(model, path, layer)
            self.layers.append(layer)
            found.add(short_name)
        missing = targets - found
        if missing:
            linears = sorted(
                {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)}
            )
            raise ModuleSpecError(
                f"the base model has no linear projection named {sorted(missing)}; "
                f"its projections are {linears}"
            )

    # ---- one user's tensors ----------------------------------------------------------------------

    def check_slot(self, slot: int) -> None:
        if not 1 <= slot < self.slots:
            raise EngineError(
                f"slot {slot} is out of range: user slots are 1..{self.slots - 1} (0 is 'no module')"
            )

    def read(self, slot: int) -> dict[str, torch.Tensor]:
        self.check_slot(slot)
        return {name: tensor[slot].detach().clone() for name, tensor in self.tensors.items()}

    def write(self, slot: int, module: Mapping[str, torch.Tensor]) -> None:
        """Put one user's tensors into ``slot``; every other slot is left untouched."""
        self.check_slot(slot)
        # Every shape is checked before anything is copied, so a refused module leaves the slot's user
        # as they were rather than half overwritten.
        _check_fits("module", module, {name: t.shape[1:] for name, t in self.tensors.items()})
        with torch.no_grad():
            for name, value in module.items():
                self.tensors[name][slot].copy_(value)

    def reset(self, slot: int, generator: torch.Generator) -> None:
        """A fresh user: the kind's initial values (PEFT's defaults), drawn from ``generator``.

        Drawn on the CPU whatever the bank's device, so the same seed gives the same user everywhere."""
        self.check_slot(slot)
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                fresh = torch.empty(tensor.shape[1:], dtype=torch.float32)
                self.kind.init_user(self._suffix[name], fresh, generator)
                tensor[slot].copy_(fresh)

    def clear(self, slot: int) -> None:
        """Make ``slot`` the identity again (its user was evicted or forgotten)."""
        self.check_slot(slot)
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                tensor[slot].fill_(self.kind.identity_value(self._suffix[name]))

    def is_identity(self, slot: int) -> bool:
        return all(
            bool((tensor[slot] == self.kind.identity_value(self._suffix[name])).all())
            for name, tensor in self.tensors.items()
        )

    def parameter_count(self) -> int:
        """Trainable numbers one user owns."""
        return sum(t[0].numel() for t in self.tensors.values())

    def write_shared(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Put the task's trained shared part in place (every name and shape checked first)."""
        _check_fits("shared part", tensors, {name: t.shape for name, t in self.shared.items()})
        with torch.no_grad():
            for name, value in tensors.items():
                self.shared[name].copy_(value)

    def read_shared(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().clone() for name, tensor in self.shared.items()}

    def trainable(self, enabled: bool) -> None:
        """Bank tensors take gradients and module dropout is on (or both off); the base stays frozen."""
        for tensor in self.tensors.values():
            tensor.requires_grad_(enabled)
        for layer in self.layers:
            layer.train(enabled)


class SlotSpace:
    """Several banks on one model under one slot numbering, so a batch can mix users of every kind.

    Global slot 0 is the identity; bank ``i`` owns the global ids ``offsets[i] + 1 .. offsets[i] +
    slots_i - 1`` (its local slots 1..). With one bank, global and local ids are the same. Routing a batch
    gives each bank's router the rows' local ids, 0 for rows of other banks, so a layer adds only the
    terms of its own users."""

    def __init__(self, banks: Sequence[SlotBank], routers: Sequence[SlotRouter]) -> None:
        self.banks = list(banks)
        self.routers = list(routers)
        self.offsets: list[int] = []
        owner, local = [-1], [0]  # global id -> bank index, local slot
        for index, bank in enumerate(self.banks):
            self.offsets.append(len(owner) - 1)
            owner += [index] * (bank.slots - 1)
            local += list(range(1, bank.slots))
        device = self.banks[0].device
        self.size = len(owner)
        self._owner = torch.tensor(owner, device=device)  # [size]
        self._local = torch.tensor(local, device=device)  # [size]

    def global_slot(self, bank_index: int, local_slot: int) -> int:
        self.banks[bank_index].check_slot(local_slot)
        return self.offsets[bank_index] + local_slot

    def locate(self, slot: int) -> tuple[int, int]:
        """(bank index, local slot) of a global user slot."""
        if not 1 <= slot < self.size:
            raise EngineError(
                f"slot {slot} is out of range: user slots are 1..{self.size - 1} (0 is 'no module')"
            )
        return int(self._owner[slot]), int(self._local[slot])

    def local_ids(self, bank_index: int, slot_ids: torch.Tensor) -> torch.Tensor:
        """[rows] global ids -> [rows] ids in bank ``bank_index`` (0 for other banks' rows)."""
        if len(self.banks) == 1:
            return slot_ids
        return torch.where(self._owner[slot_ids] == bank_index, self._local[slot_ids], 0)

    @contextlib.contextmanager
    def route(self, slot_ids: torch.Tensor) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for index, router in enumerate(self.routers):
                stack.enter_context(router.route(self.local_ids(index, slot_ids)))
            yield


def _check_fits(what: str, found: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size]) -> None:
    """An ``EngineError`` unless ``found`` has exactly the names of ``shapes``, each of that shape."""
    if set(found) != set(shapes):
        missing, extra = sorted(set(shapes) - set(found)), sorted(set(found) - set(shapes))
        raise EngineError(
            f"{what} does not fit this bank: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
            f", unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    for name, value in found.items():
        if tuple(value.shape) != tuple(shapes[name]):
            raise EngineError(
                f"tensor {name} has shape {tuple(value.shape)}, the bank expects {tuple(shapes[name])}"
            )


def _replace_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)
