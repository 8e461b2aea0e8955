"""The slot bank: every resident user's tensors stacked per adapted projection, and the layers that read
them. Each row of a batch carries a slot index; an adapted layer gathers its rows' tensors and adds their
terms to one shared base matmul, so the number of resident users costs memory, not time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from tailorlm.engine import modules
from tailorlm.engine.modules import ModuleSpec, ModuleSpecError, PromptSpec


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
        tensors: dict[str, nn.Parameter],
    ) -> None:
        super().__init__()
        self.base = base
        self.short_name = short_name
        self.spec = spec
        self.router = router
        # Deliberately not registered as parameters: the bank owns them, and the wrapped model's own
        # parameter walks (dtype, device, state_dict) should keep seeing only the base weights.
        self.bank_tensors = tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot_ids = self.router.slot_ids
        if slot_ids is None:
            raise EngineError("a slot-adapted layer ran outside Engine: no slot ids were set for the batch")
        if self.router.only_identity:
            return self.base(x)
        if x.shape[0] != slot_ids.shape[0]:
            raise EngineError(f"batch has {x.shape[0]} rows but {slot_ids.shape[0]} slot ids")
        rows = {suffix: tensor.index_select(0, slot_ids) for suffix, tensor in self.bank_tensors.items()}
        return modules.apply_to_linear(self.spec, self.short_name, self.base, x, rows, self.training)


class SlotBank:
    """All slots' tensors for one module spec on one model. Slot 0 is the identity (no module)."""

    def __init__(self, model: nn.Module, spec: ModuleSpec, slots: int, router: SlotRouter) -> None:
        if slots < 2:
            raise EngineError("a slot bank needs at least 2 slots: slot 0 is reserved for 'no module'")
        if any(isinstance(m, SlotLinear) for m in model.modules()):
            raise EngineError(
                "this base model already carries slot layers; load a fresh base model for each "
                "engine (wrapping twice would stack two users' terms)"
            )
        self.spec = modules.validate(spec)
        self.slots = slots
        self.tensors: dict[str, nn.Parameter] = {}
        self.layers: list[SlotLinear] = []
        self._suffix: dict[str, str] = {}
        if isinstance(spec, PromptSpec):
            shape = (spec.virtual_tokens, model.get_input_embeddings().embedding_dim)
            self._add("prompt_embeddings", "prompt_embeddings", shape)
        else:
            self._wrap_linears(model, router)

    def _add(self, name: str, suffix: str, shape: tuple[int, ...]) -> nn.Parameter:
        tensor = nn.Parameter(
            torch.full((self.slots, *shape), modules.identity_value(suffix)), requires_grad=False
        )
        self.tensors[name] = tensor
        self._suffix[name] = suffix
        return tensor

    def _wrap_linears(self, model: nn.Module, router: SlotRouter) -> None:
        targets = set(self.spec.targets)
        found: set[str] = set()
        for path, module in list(model.named_modules()):
            short_name = path.rsplit(".", 1)[-1]
            if short_name not in targets or not isinstance(module, nn.Linear):
                continue
            shapes = modules.linear_tensor_shapes(self.spec, short_name, module)
            own = {
                suffix: self._add(modules.tensor_name(self.spec, path, suffix), suffix, shape)
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
        if set(module) != set(self.tensors):
            missing, extra = sorted(set(self.tensors) - set(module)), sorted(set(module) - set(self.tensors))
            raise EngineError(
                f"module does not fit this bank: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                f", unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
            )
        with torch.no_grad():
            for name, value in module.items():
                target = self.tensors[name][slot]
                if tuple(value.shape) != tuple(target.shape):
                    raise EngineError(
                        f"tensor {name} has shape {tuple(value.shape)}, the bank expects "
                        f"{tuple(target.shape)}"
                    )
                target.copy_(value)

    def reset(self, slot: int, generator: torch.Generator) -> None:
        """A fresh user: PEFT's default initialisation, drawn from ``generator``."""
        self.check_slot(slot)
        for name, tensor in self.tensors.items():
            modules.init_user_tensor(self._suffix[name], tensor.data[slot], generator)

    def clear(self, slot: int) -> None:
        """Make ``slot`` the identity again (its user was evicted or forgotten)."""
        self.check_slot(slot)
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                tensor[slot].fill_(modules.identity_value(self._suffix[name]))

    def parameter_count(self) -> int:
        """Trainable numbers one user owns."""
        return sum(t[0].numel() for t in self.tensors.values())

    def trainable(self, enabled: bool) -> None:
        """Bank tensors take gradients and module dropout is on (or both off); the base stays frozen."""
        for tensor in self.tensors.values():
            tensor.requires_grad_(enabled)
        for layer in self.layers:
            layer.train(enabled)


def _replace_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def base_linear(model: nn.Module, path: str) -> nn.Linear:
    """The frozen base projection at ``path``, seen through a slot wrapper if there is one."""
    module = model.get_submodule(path)
    return module.base if isinstance(module, SlotLinear) else module


def merge_lora_into_base(model: nn.Module, spec: modules.LoraSpec, module: Mapping[str, torch.Tensor]) -> int:
    """Fold a LoRA module into the base weights (``W += scale * B A``): OPPU's shared task adapter becomes
    part of the base every personal module then builds on. Returns how many projections changed."""
    by_path: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in module.items():
        path, _, suffix = name.removeprefix(modules.PEFT_PREFIX).rpartition(".lora_")
        by_path.setdefault(path, {})["lora_" + suffix] = value
    with torch.no_grad():
        for path, pair in by_path.items():
            if set(pair) != {"lora_A.weight", "lora_B.weight"}:
                raise EngineError(f"LoRA module is incomplete at {path}: has {sorted(pair)}")
            linear = base_linear(model, path)
            linear.weight += spec.scale * (pair["lora_B.weight"].float() @ pair["lora_A.weight"].float())
    return len(by_path)
