"""Multi-user training against stock PEFT one user at a time, on synthetic and on real task rows, with useful
FLOP/s against the run's GEMM peak."""

from __future__ import annotations

import dataclasses
import math

import pytest

from tailorlm.perf import gemm, train, workloads
from tailorlm.perf.contenders import PEFT_TRAIN, engine_train_name, prefix_switch
from tailorlm.perf.harness import Bench


@pytest.fixture(scope="module")
def train_bench(small) -> Bench:
    """Two users of two examples each: one step per user keeps both training sections quick."""
    bench = Bench(dataclasses.replace(small, users_per_batch=2))
    bench.shared[gemm.PEAK_KEY] = {"fp32": (10.0, "a planted peak")}  # the GEMM section is tested alone
    return bench


def _engine_names(users: int) -> list[str]:
    if prefix_switch() is None:
        return [engine_train_name(users)]
    return [engine_train_name(users, True), engine_train_name(users, False)]


@pytest.mark.parametrize("section_name", ["train", "train-task"])
def test_training_sections_compare_the_engine_with_stock_peft(train_bench, section_name):
    bench = train_bench
    config = bench.config
    runner = train.bench_train if section_name == "train" else train.bench_train_task
    section = runner(bench)
    users = config.users_per_batch
    names = [*_engine_names(users), PEFT_TRAIN]
    assert [t.name for t in section.timings] == names
    examples = users * config.train_examples
    assert all(t.items == examples and len(t.seconds) == config.train_repeats for t in section.timings)
    (check,) = section.checks
    assert (check.numerator, check.denominator, check.target) == (PEFT_TRAIN, names[0], train.TARGET_TRAIN)
    facts = section.facts
    assert facts["steps_peft"] == users * facts["steps_engine"]
    assert all(math.isfinite(loss) for loss in facts["mean_loss"].values())
    assert facts["real_tokens"] <= facts["positions_run"][PEFT_TRAIN]
    # Useful FLOP/s: 4 x non-embedding parameters x real tokens / median seconds, against the peak.
    parameters = train.non_embedding_parameters(bench.bare.model)
    for timing in section.timings:
        expected = 4 * parameters * facts["real_tokens"] / timing.median / 1e9
        assert facts["useful_gflops"][timing.name] == pytest.approx(expected)
        assert facts["fraction_of_gemm_peak"][timing.name] == pytest.approx(expected / 10.0)
        ran = 4 * parameters * facts["positions_run"][timing.name] / timing.median / 1e9
        assert facts["run_gflops"][timing.name] == pytest.approx(ran)
    (table,) = section.tables
    assert [row[0] for row in table.rows] == names
    assert any("4 x N x real tokens" in note for note in section.notes)
    if prefix_switch() is not None:
        shared, plain = names[:2]
        assert facts["positions_run"][shared] < facts["positions_run"][plain]  # the prefixes ran once
        assert "prefix_sharing_gain" in facts


def test_the_task_section_trains_on_the_task_rows(train_bench):
    config = train_bench.config
    users = workloads.task_users(train_bench.tokenizer, config.task, 2, config.train_examples, config.seed)
    assert all(len(u.train) == config.train_examples for u in users)


def test_useful_flop_counts_four_times_the_non_embedding_parameters(bench):
    model = bench.bare.model
    embeddings = model.get_input_embeddings().weight.numel()  # tied with the vocabulary projection
    total = sum(p.numel() for p in model.parameters())
    assert train.non_embedding_parameters(model) == total - embeddings
    assert train.useful_flop(1_000, 7) == 28_000
    assert train.train_kind() == "lora"
