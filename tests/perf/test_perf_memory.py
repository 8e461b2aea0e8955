"""Where training memory goes: torch's exact sizes, saved activations by width, RSS around a step."""

from __future__ import annotations

import torch

from tailorlm import kinds
from tailorlm.engine.engine import Engine
from tailorlm.perf import memory, workloads
from tailorlm.perf.contenders import prefix_switch
from tailorlm.train.trainer import TrainConfig, UserData


def test_saved_tensors_are_counted_once_and_grouped_by_width(bench):
    model = bench.bare.model  # tiny: hidden 64, feed-forward 128, head_dim 16, vocabulary 49152
    saved = memory.SavedTensors(model, model.parameters())
    assert saved.group((2, 5, 128)) == memory.FEED_FORWARD
    assert saved.group((2, 4, 5, 16)) == memory.HEADS
    assert saved.group((2, 5, 64)) == memory.HIDDEN
    assert saved.group((3, 49152)) == memory.VOCAB
    assert saved.group((2, 1, 5, 5)) == memory.MASK
    assert saved.group((2, 8, 5)) == memory.OTHER
    weight = torch.ones(64, 10, requires_grad=True)
    x = torch.ones(2, 5, 64, requires_grad=True)
    with saved.watching():
        y = x @ weight  # saves x [2, 5, 64] and weight [64, 10]
        (y * y).sum()  # saves y [2, 5, 10] twice: one storage, counted once
    assert saved.by_group() == {memory.HIDDEN: 4 * 2 * 5 * 64, memory.OTHER: 4 * (64 * 10 + 2 * 5 * 10)}
    assert saved.total == sum(saved.by_group().values())
    without_weight = memory.SavedTensors(model, [weight])
    with without_weight.watching():
        (x @ weight).sum()
    assert without_weight.total == 4 * 2 * 5 * 64  # parameters are not activations


def test_the_activation_estimate_follows_the_config(bench):
    # Per layer and position: 3 x 128 + 3 x 64 + 4 x 64 (q, repeated k and v, output) = 832 numbers;
    # per layer a 2 x 5 x 5 mask; 2 layers; one vocabulary row per label position.
    estimate = memory.activation_estimate(bench.bare.model, rows=2, width=5, label_positions=3)
    assert estimate == 4 * (2 * (2 * 5 * 832 + 2 * 5 * 5) + 49152 * 3)


def test_the_memory_section_breaks_a_training_step_down(bench, small):
    section = memory.bench_memory(bench)
    facts = section.facts
    slots = max(small.users_per_batch, 16 // small.train_batch) + 1
    numbers = facts["bank_bytes"] // (4 * slots)
    assert facts["bank_bytes"] == 4 * slots * numbers
    assert facts["optimizer_moment_bytes"] == 2 * facts["bank_bytes"]
    assert facts["base_weight_bytes"] == 4 * sum(p.numel() for p in bench.bare.model.parameters())
    probes = facts["probes"]
    assert set(probes) == {small.task, f"~{small.memory_long_tokens}-token"}
    for probe in probes.values():
        assert probe["rows"] == 16  # one micro-batch of whole users
        assert probe["saved"] == sum(probe["groups"].values()) > 0
        # The loss keeps one vocabulary-wide row per label position: exactly what the hooks saw.
        assert probe["groups"][memory.VOCAB] == 4 * 49152 * probe["label_positions"]
        assert probe["rss_mb_peak"] >= probe["rss_mb_start"]
    long = probes[f"~{small.memory_long_tokens}-token"]
    assert long["saved"] > probes[small.task]["saved"]
    main, by_width = section.tables
    assert len(main.rows) >= 10 and [row[0] for row in by_width.rows] == list(memory.GROUPS)
    assert any("GiB" in note for note in section.notes)


def test_the_estimate_accounts_for_what_a_plain_pass_keeps(bench):
    switch = prefix_switch()
    plain = {switch: False} if switch else {}
    engine = Engine(bench.fresh_base(), kinds.default_spec("lora"), slots=5, max_length=512, **plain)
    prompts = workloads.chat_prompts(bench.tokenizer, 96, 16, seed=0)
    users = [UserData(f"u{u}", [(p, "3 stars") for p in prompts[4 * u : 4 * u + 4]]) for u in range(4)]
    watched = memory.probe(engine, TrainConfig(epochs=1, batch_size=4), users)
    assert (watched.rows, watched.positions) == (16, 16 * watched.width)
    estimate = memory.activation_estimate(engine.model, watched.rows, watched.width, watched.label_positions)
    assert 0.9 < watched.saved / estimate < 1.1  # the rest: module terms, rotary tables, norm scales
