"""A mixed batch per registered kind: every contender runs the same rows, PEFT (where it can mix adapters in
one batch) holds the same modules and gives the same logits."""

from __future__ import annotations

import pytest

from tailorlm import kinds
from tailorlm.kinds.ia3 import IA3Spec
from tailorlm.kinds.lora import LoraSpec
from tailorlm.perf import mixed
from tailorlm.perf.contenders import BARE, ENGINE, PEFT_MIXED, peft_mixes_batches


@pytest.mark.parametrize("kind", list(kinds.MODEL_KINDS))
def test_a_mixed_batch_of_every_kind(bench, small, kind):
    section = mixed.bench_mixed(bench, kind)
    names = [t.name for t in section.timings]
    spec = kinds.default_spec(kind)
    if peft_mixes_batches(spec):
        assert names == [ENGINE, BARE, PEFT_MIXED]
        assert section.facts["max_abs_logit_diff_vs_peft"] < 1e-3  # same modules, same rows, same answers
        assert section.timing(PEFT_MIXED).resident == small.users_per_batch
        assert [c.target for c in section.checks] == [mixed.target_vs_base(kind), mixed.TARGET_VS_PEFT]
    else:
        assert names == [ENGINE, BARE]
        assert [c.target for c in section.checks] == [mixed.target_vs_base(kind)]
        assert any("no PEFT contender" in note for note in section.notes)
    assert section.timing(ENGINE).resident == section.facts["resident"] <= small.resident
    assert all(len(t.seconds) == small.repeats and min(t.seconds) > 0 for t in section.timings)
    assert (section.checks[0].numerator, section.checks[0].denominator) == (BARE, ENGINE)
    assert len(set(section.facts["users"])) == small.users_per_batch
    assert section.facts["width"] <= small.tokens + 2
    assert section.facts["spec"] == kinds.spec_to_dict(spec)


def test_peft_contends_only_where_it_routes_adapter_names():
    # PEFT's IA3 ignores adapter_names (every row would get the active adapter): no contender there.
    assert peft_mixes_batches(LoraSpec())
    assert not peft_mixes_batches(IA3Spec())


def test_the_issue_targets_are_stricter_for_lora():
    assert mixed.target_vs_base("lora") == 0.9
    assert mixed.target_vs_base("some-kind-added-later") == mixed.TARGET_VS_BASE == 0.85
