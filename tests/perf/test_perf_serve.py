"""``perf serve``'s parts on the tiny model: the workload, the load driver against live servers of every
contender, the stock-PEFT contender answering exactly what tailorlm answers for the same user, and the
bare base model answering every user alike."""

from __future__ import annotations

import asyncio
import copy

import httpx
import numpy as np

from tailorlm import models
from tailorlm.perf.serve import (
    BARE,
    PEFT,
    SINGLE,
    SKEWED,
    TAILORLM,
    UNIFORM,
    ServeLoadConfig,
    build_store,
    contender_server,
    drive,
    plan,
    precision_runs,
    server_config,
    user_name,
)
from tailorlm.serve.run import answering, free_port
from tailorlm.serve.scheduler import JobScheduler


def fresh(tiny: models.BaseModel) -> models.BaseModel:
    return models.BaseModel(copy.deepcopy(tiny.model), tiny.tokenizer, tiny.name, None)


def test_plans_follow_the_workload(tiny):
    config = ServeLoadConfig(requests=400)
    uniform = plan(config, 200, UNIFORM, None, seed=1)
    skewed = plan(config, 200, SKEWED, 5.0, seed=1)
    assert len(uniform) == 400 and all(p.at is None for p in uniform)
    for item in uniform:
        assert 16 <= item.max_tokens <= 64
        assert 32 <= len(item.prompt.split()) <= 128
        tokens = len(tiny.tokenizer(item.prompt, add_special_tokens=False)["input_ids"])
        assert 0.8 * len(item.prompt.split()) <= tokens <= 1.3 * len(item.prompt.split())
    counts = lambda plans: np.bincount([int(p.user.split("-")[1]) for p in plans], minlength=200)  # noqa: E731
    assert counts(uniform).max() < 10  # about 2 each
    assert np.sort(counts(skewed))[-10:].sum() > 0.15 * 400  # a few users take a large share
    arrivals = np.diff([0.0, *(p.at for p in skewed)])
    assert 0.15 < arrivals.mean() < 0.25  # Poisson at 5/s: mean gap 0.2 s
    assert plan(config, 200, UNIFORM, None, seed=1) == uniform  # seeded


def test_driver_and_contenders_against_live_servers(tmp_path, tiny, monkeypatch):
    """Each contender's server as ``perf serve`` builds it (its scheduler through the one protocol):
    tailorlm and stock PEFT give every user the same greedy answer; the bare base model gives every user
    the base model's, and loads no module."""
    monkeypatch.setattr(models, "load_base", lambda name=None, device=None, dtype=None: fresh(tiny))
    key = build_store(tmp_path, 6, models.TINY_MODEL, seed=0)
    config = ServeLoadConfig(
        model=models.TINY_MODEL,
        requests=8,
        clients=3,
        seconds=60,
        new_tokens=(4, 8),
        prompt_tokens=(8, 16),
        slots=2,
        max_batch=4,
        wait_ms=2.0,
    )
    answers = {}
    for contender in (TAILORLM, PEFT, BARE):
        server = contender_server(contender, server_config(tmp_path, free_port(), config), config)
        assert isinstance(server.scheduler, JobScheduler)
        with answering(server):
            outcomes, seconds = asyncio.run(drive(server.url, key, plan(config, 6, UNIFORM, None, 0), 3, 60))
            assert [o.status for o in outcomes] == [200] * 8 and seconds > 0
            assert all(o.ttft is not None and o.ttft <= o.latency for o in outcomes)
            assert sorted(o.tokens for o in outcomes) == sorted(
                p.max_tokens for p in plan(config, 6, UNIFORM, None, 0)
            )
            if (
                contender != PEFT
            ):  # tailorlm streams token by token (the PEFT contender sends its text at once)
                assert all(len(o.gaps) == o.tokens - 1 and 0 <= sum(o.gaps) <= o.latency for o in outcomes)
            answers[contender] = [
                httpx.post(
                    f"{server.url}/v1/completions",
                    json={
                        "model": user_name(u),
                        "prompt": "A short question",
                        "max_tokens": 6,
                        "temperature": 0,
                    },
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=60,
                ).json()["choices"][0]["text"]
                for u in range(6)
            ]
            loads = server.metrics.registry.get_sample_value("tailorlm_slot_misses_total")
            assert (loads == 0) == (contender == BARE), (contender, loads)
    assert answers[TAILORLM] == answers[PEFT]
    assert len(set(answers[TAILORLM])) > 1  # users' modules differ, so their answers do
    assert len(set(answers[BARE])) == 1 and answers[BARE][0] not in answers[TAILORLM]


def test_precision_runs_are_each_dtype_then_one_client_in_the_default_and_fp32():
    config = ServeLoadConfig(clients=64, requests=128, single_client_requests=5)
    runs = dict(precision_runs(config))
    assert list(runs) == ["tailorlm-fp32", "tailorlm-bf16", SINGLE, f"{SINGLE}-fp32"]
    assert runs["tailorlm-bf16"].dtype == "bf16" and runs["tailorlm-bf16"].clients == 64
    assert runs[SINGLE].dtype is None and (runs[SINGLE].clients, runs[SINGLE].requests) == (1, 5)
    assert runs[f"{SINGLE}-fp32"].dtype == "fp32" and runs[f"{SINGLE}-fp32"].clients == 1
    none = ServeLoadConfig(compare_dtypes=(), single_client_requests=0)
    assert precision_runs(none) == []
