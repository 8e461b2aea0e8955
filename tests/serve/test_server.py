"""The server's roles: a local server (engine, slots and scheduler in this process) answers; the front
alone (``Server``, as the Ray front and the PEFT baseline use it) serves through whatever ``JobScheduler``
its factory makes, with the same answers, and forgets through it."""

from __future__ import annotations

import httpx
from serve_helpers import build_store, fresh, serve_config

from tailorlm.engine.engine import Engine
from tailorlm.engine.slots import SlotManager
from tailorlm.serve.run import answering
from tailorlm.serve.scheduler import JobScheduler, Scheduler
from tailorlm.serve.server import LocalServer, Server, module_loader

USER = "lora-user-0"


def answers(server: Server, key: str) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"}
    found = []
    for prompt in ("The weather today", "Once upon a time"):
        body = {"model": USER, "prompt": prompt, "max_tokens": 6, "temperature": 0}
        reply = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=60)
        assert reply.status_code == 200, reply.text
        found.append(reply.json()["choices"][0]["text"])
    return found


def health(server: Server) -> dict:
    reply = httpx.get(f"{server.url}/health", timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_front_serves_through_the_scheduler_it_is_given(tmp_path, tiny):
    users = build_store(tmp_path / "store", tiny, per_kind=1)
    config = serve_config(users.root, retrain=False)

    with answering(LocalServer(config, base=fresh(tiny))) as local:
        assert local.engine is not None and isinstance(local.scheduler, Scheduler)
        assert isinstance(local.scheduler, JobScheduler)
        expected = answers(local, users.keys[USER])
        assert health(local)["slots"] == config.slots * len(local.specs)

    def own_engine(server: Server) -> Scheduler:
        """tailorlm's scheduler over an engine this test builds: the front does not know it has one."""
        engine = Engine(fresh(tiny), server.specs, slots=config.slots + 1, max_length=config.max_context)
        managers = [SlotManager(bank, module_loader(server.store, bank.spec)) for bank in engine.banks]
        return Scheduler(engine, managers, server.config.scheduler, server.metrics)

    front = Server(serve_config(users.root, retrain=False), own_engine, engines=2)
    with answering(front):
        assert front.engine is None and isinstance(front.scheduler, JobScheduler)
        assert answers(front, users.keys[USER]) == expected
        assert health(front)["slots"] == 2 * config.slots * len(front.specs)
        admin = {"Authorization": f"Bearer {users.admin}"}
        gone = httpx.delete(f"{front.url}/v1/users/{USER}", headers=admin, timeout=60)
        assert gone.status_code == 200, gone.text
        assert gone.json()["slots_cleared"] == 1  # the scheduler reset the slot that held the module
        assert not any(key.endswith(f":{USER}") for m in front.scheduler.managers for key in m.resident())


def test_every_role_refuses_a_label_request_over_its_memory_bound(tmp_path, tiny):
    """A label request whose scoring would take more than ``max_request_bytes`` is a 400 before any work,
    from a local server (its engine's bound) and from a front whose engines are elsewhere (the same bound
    from the base model's config, fp32): the Ray front's replicas submit straight to their scheduler, so
    the front is where it is checked. A cheap request passes both."""
    users = build_store(tmp_path / "store", tiny, per_kind=1)
    config = serve_config(users.root, retrain=False, max_context=1024, max_request_bytes=64 << 20)
    headers = {"Authorization": f"Bearer {users.keys[USER]}"}
    cheap = {"model": USER, "prompt": "Is it", "labels": ["yes", "no"], "raw_prompt": True}
    # 40 labels of a few tokens after a long prompt: about 260 MiB by the bound (tiny model, fp32).
    labels = [f"answer number {i} of many" for i in range(40)]
    costly = {"model": USER, "prompt": "word " * 100, "labels": labels, "raw_prompt": True}

    def statuses(server: Server) -> tuple[int, int, dict]:
        url = f"{server.url}/v1/completions"
        ok = httpx.post(url, json=cheap, headers=headers, timeout=60)
        refused = httpx.post(url, json=costly, headers=headers, timeout=60)
        return ok.status_code, refused.status_code, refused.json()

    with answering(LocalServer(config, base=fresh(tiny))) as local:
        assert local.label_memory(100, 40, 7) > config.max_request_bytes
        ok, refused, body = statuses(local)
        assert (ok, refused) == (200, 400) and body["error"]["code"] == "request_too_expensive", body
        assert local.scheduler.pending() == 0

    def own_engine(server: Server) -> Scheduler:
        engine = Engine(fresh(tiny), server.specs, slots=config.slots + 1, max_length=config.max_context)
        managers = [SlotManager(bank, module_loader(server.store, bank.spec)) for bank in engine.banks]
        return Scheduler(engine, managers, server.config.scheduler, server.metrics)

    front = Server(config, own_engine)
    with answering(front):
        assert front.engine is None
        ok, refused, body = statuses(front)
        assert (ok, refused) == (200, 400) and body["error"]["code"] == "request_too_expensive", body
        assert front.label_memory(100, 40, 7) == local.label_memory(100, 40, 7)  # the same bound, fp32
