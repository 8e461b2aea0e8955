"""Module kinds: one file per kind beside ``kind.py`` (the protocol every kind implements), listed once in
``registry.py``. Import a spec from its kind's file (``from tailorlm.kinds.lora import LoraSpec``) and
everything generic from here."""

from tailorlm.kinds.kind import PEFT_PREFIX, ModuleKind, ModuleSpec, ModuleSpecError
from tailorlm.kinds.registry import (
    KINDS,
    MODEL_KINDS,
    default_spec,
    for_labels,
    get,
    names,
    of,
    same_layout,
    spec_from_dict,
    spec_from_peft_config,
    spec_to_dict,
    validate,
)

__all__ = [
    "KINDS",
    "MODEL_KINDS",
    "PEFT_PREFIX",
    "ModuleKind",
    "ModuleSpec",
    "ModuleSpecError",
    "default_spec",
    "for_labels",
    "get",
    "names",
    "of",
    "same_layout",
    "spec_from_dict",
    "spec_from_peft_config",
    "spec_to_dict",
    "validate",
]
