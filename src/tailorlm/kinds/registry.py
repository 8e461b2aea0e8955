"""The registry of module kinds: the only list of them. A new kind is one file beside this one and one
entry in ``KINDS``; the bank, the engine, the module files, training, perf, the method setups and the
contract tests all iterate this registry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tailorlm.kinds.bottleneck import Bottleneck
from tailorlm.kinds.collab import Collab
from tailorlm.kinds.ia3 import IA3
from tailorlm.kinds.kind import ModuleKind, ModuleSpecError
from tailorlm.kinds.label_bias import LabelBias
from tailorlm.kinds.lora import Lora
from tailorlm.kinds.prompt import Prompt

KINDS: dict[str, ModuleKind] = {
    kind.name: kind for kind in (Lora(), IA3(), Prompt(), Bottleneck(), Collab(), LabelBias())
}
# The kinds that change the model's outputs: trained by the language-model loss, held to the logits
# contract, benchmarked as per-user modules and measured by perf.
MODEL_KINDS: dict[str, ModuleKind] = {name: kind for name, kind in KINDS.items() if kind.acts_on_model}
_BY_SPEC_TYPE: dict[type, ModuleKind] = {kind.spec_type: kind for kind in KINDS.values()}
_BY_PEFT_TYPE: dict[str, ModuleKind] = {k.peft_type: k for k in KINDS.values() if k.peft_type}


def names() -> list[str]:
    return list(KINDS)


def get(name: str) -> ModuleKind:
    if name not in KINDS:
        raise ModuleSpecError(f"unknown module kind {name!r}; expected one of {sorted(KINDS)}")
    return KINDS[name]


def of(spec: Any) -> ModuleKind:
    """The kind a spec object belongs to."""
    kind = _BY_SPEC_TYPE.get(type(spec))
    if kind is None:
        raise ModuleSpecError(f"{type(spec).__name__} is not the spec of a registered module kind")
    return kind


def validate(spec: Any) -> Any:
    """``spec`` itself once its kind has checked its values."""
    of(spec).validate(spec)
    return spec


def for_labels(spec: Any, labels: Any) -> Any:
    """``spec`` for a task with ``labels`` (``ModuleKind.for_labels``)."""
    return of(spec).for_labels(spec, labels)


def default_spec(name: str) -> Any:
    """The kind's spec with its default settings (what the benchmark and perf use unless told)."""
    return get(name).spec_type()


def spec_to_dict(spec: Any) -> dict[str, Any]:
    return of(spec).spec_to_dict(spec)


def spec_from_dict(data: Mapping[str, Any]) -> Any:
    data = dict(data)
    return get(data.pop("kind", None)).spec_from_dict(data)


def spec_from_peft_config(config: Mapping[str, Any]) -> Any:
    """Read a PEFT ``adapter_config.json`` (as a dict) back into a spec."""
    peft_type = config.get("peft_type")
    if peft_type not in _BY_PEFT_TYPE:
        raise ModuleSpecError(
            f"PEFT type {peft_type!r} is not one tailorlm can load ({', '.join(sorted(_BY_PEFT_TYPE))})"
        )
    return _BY_PEFT_TYPE[peft_type].spec_from_peft(config)


def same_layout(a: Any, b: Any) -> bool:
    """Whether two specs give users tensors of the same names and shapes."""
    return type(a) is type(b) and of(a).same_layout(a, b)
