"""The registry: the only list of module kinds, and the lookups every generic caller goes through."""

from __future__ import annotations

import pytest

from tailorlm import kinds
from tailorlm.kinds import ModuleKind, ModuleSpecError


def test_every_kind_is_registered_once_under_its_own_name():
    assert kinds.names() == list(kinds.KINDS)
    for name, kind in kinds.KINDS.items():
        assert isinstance(kind, ModuleKind) and kind.name == name
        assert kind.spec_type.kind == name
        spec = kinds.default_spec(name)
        assert type(spec) is kind.spec_type and kinds.of(spec) is kind and kinds.get(name) is kind
        assert kinds.validate(spec) is spec
        assert kind.learning_rate > 0
    spec_types = [kind.spec_type for kind in kinds.KINDS.values()]
    assert len(set(spec_types)) == len(spec_types)
    peft_types = [kind.peft_type for kind in kinds.KINDS.values() if kind.peft_type]
    assert len(set(peft_types)) == len(peft_types)


def test_a_peft_type_no_kind_has_is_a_named_error():
    with pytest.raises(ModuleSpecError, match="PEFT type 'LOHA' is not one tailorlm can load"):
        kinds.spec_from_peft_config({"peft_type": "LOHA"})
    with pytest.raises(ModuleSpecError, match="PEFT type None"):
        kinds.spec_from_peft_config({})


def test_unknown_kinds_specs_and_settings_are_named_errors():
    with pytest.raises(ModuleSpecError, match="unknown module kind 'dora'"):
        kinds.get("dora")
    with pytest.raises(ModuleSpecError, match="unknown module kind None"):
        kinds.spec_from_dict({"rank": 4})
    with pytest.raises(ModuleSpecError, match="not the spec of a registered module kind"):
        kinds.of(object())
    for name in kinds.names():
        with pytest.raises(ModuleSpecError, match="has no setting"):
            kinds.spec_from_dict({"kind": name, "no_such_setting": 1})


def test_specs_of_different_kinds_never_share_a_layout():
    specs = [kinds.default_spec(name) for name in kinds.names()]
    for a in specs:
        for b in specs:
            assert kinds.same_layout(a, b) == (a is b)
