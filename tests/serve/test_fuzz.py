"""The server fuzzed against its own OpenAPI schema (schemathesis: valid and invalid bodies, parameters
and values at the edges of every field) and with hypothesis strategies of the edge values of every
numeric and text field, with what must hold after every case checked: no 5xx, every request answered
within its limit, the engine loop advancing, and a well-formed request of another user, running
alongside the whole time, getting its normal answer; at the end nothing is left pending or pinned."""

from __future__ import annotations

import collections
import math
import os
import sys
import threading
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from serve_helpers import fresh, serve_config, wait_settled

from tailorlm.serve.app import create_app
from tailorlm.serve.run import background
from tailorlm.serve.scheduler import SchedulerConfig

WITNESS = "bottleneck-user-0"  # never a fuzzed request's model: its answers must stay what they are alone
FUZZED = "lora-user-0"
TIMEOUT = 30.0  # seconds any answer may take (max_context 256 on the tiny model: well under a second)
# Cases per operation and mode; TAILORLM_FUZZ_CASES=N runs N of each (the note used 400).
CASES = dict.fromkeys(("positive", "negative"), int(os.environ.get("TAILORLM_FUZZ_CASES", "25")))
SEEN: collections.Counter[int] = collections.Counter()  # status codes answered, printed at the end


@pytest.fixture(scope="module")
def fuzzed(store_users, tiny):
    config = serve_config(
        store_users.root,
        retrain=False,
        scheduler=SchedulerConfig(max_batch=8, wait_ms=2.0, max_queue=64, watchdog_seconds=5.0),
    )
    with background(config, base=fresh(tiny)) as server:
        witness = Witness(server, store_users.keys[WITNESS])
        witness.start()
        yield server, witness
        witness.stop()
        print(
            f"\nfuzz: {sum(SEEN.values())} cases, status codes {dict(sorted(SEEN.items()))}; witness "
            f"{witness.answers} answers, {len(witness.failures)} wrong",
            file=sys.stderr,
        )
        assert witness.answers > 0 and not witness.failures, witness.failures[:3]
        wait_settled(server)


class Witness(threading.Thread):
    """Another user asking the same well-formed question over and over while the fuzzing runs."""

    def __init__(self, server, key: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{server.url}/v1/completions"
        self.headers = {"Authorization": f"Bearer {key}"}
        self.body = {"model": WITNESS, "prompt": "The witness says", "max_tokens": 8, "temperature": 0}
        self.expected = httpx.post(self.url, json=self.body, headers=self.headers, timeout=TIMEOUT).json()
        self.answers = 0
        self.failures: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                answer = httpx.post(self.url, json=self.body, headers=self.headers, timeout=TIMEOUT)
            except httpx.HTTPError as error:
                self.failures.append(repr(error))
                continue
            if answer.status_code != 200:
                self.failures.append(f"{answer.status_code} {answer.text[:200]}")
            elif answer.json()["choices"] != self.expected["choices"]:
                self.failures.append(f"a different answer: {answer.json()['choices']}")
            self.answers += 1

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=TIMEOUT)


def check(server, answer, started: float) -> None:
    """What must hold after every case."""
    took = time.monotonic() - started
    SEEN[answer.status_code] += 1
    assert answer.status_code < 500, f"{answer.status_code}: {answer.text[:300]}"
    assert took < TIMEOUT, f"the answer took {took:.1f} s"
    assert server.scheduler.stalled_for() < server.config.scheduler.watchdog_seconds


def operations(server):
    schema = schemathesis.openapi.from_dict(create_app(server).openapi())
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", list(CASES))
def test_every_operation_fuzzed_against_the_schema(fuzzed, store_users, mode):
    server, _witness = fuzzed
    headers = {"Authorization": f"Bearer {store_users.admin}"}
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    for operation in operations(server):
        if operation.method.upper() == "DELETE" and "{user_id}" in operation.path:
            continue  # forgetting random users is test_forget's; the witness must stay

        @settings(
            max_examples=CASES[mode],
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=generation))
        def one(case) -> None:
            if isinstance(case.body, dict) and "model" in case.body and mode == "positive":
                case.body["model"] = FUZZED  # reach the engine, not only the 404 of an unknown model
            started = time.monotonic()
            answer = case.call(base_url=server.url, headers=headers, timeout=TIMEOUT)
            check(server, answer, started)

        try:
            one()
        except Unsatisfiable:
            assert mode == "negative"  # an operation with nothing to send has no invalid form (GET /health)


EDGE_INTS = [0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**100]
EDGE_FLOATS = [0.0, 5e-324, 1e-300, 1e-9, 0.00999, 0.01, 0.5, 1.0, 1.0000001, 2.0, 1e308, -0.0, -5e-324]
EDGE_TEXT = ["", " ", "\x00", "é", "\U0001f600" * 50, "\ud7ff", "a" * 5000, "\n" * 300, "<|im_end|>"]
SPECIAL = ["NaN", "Infinity", "-Infinity"]  # what Python's JSON parser accepts and JSON does not allow


def encode(body: dict) -> bytes:
    """JSON, with the special floats written as Python's parser reads them."""
    import json

    text = json.dumps(body, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


numbers = st.one_of(
    st.sampled_from(EDGE_INTS), st.sampled_from(EDGE_FLOATS), st.sampled_from([math.nan, math.inf])
)
field_values = {
    "max_tokens": numbers,
    "temperature": numbers,
    "top_p": numbers,
    "seed": numbers,
    "n": numbers,
    "logprobs": numbers,
    "prompt": st.one_of(st.sampled_from(EDGE_TEXT), st.text(max_size=200)),
    "stop": st.one_of(st.sampled_from(EDGE_TEXT), st.lists(st.sampled_from(EDGE_TEXT), max_size=6)),
    "labels": st.one_of(
        st.none(),
        st.lists(st.sampled_from([*EDGE_TEXT, "yes", "no", "x " * 400]), max_size=70),
        st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=70, unique=True),
    ),
    "raw_prompt": st.booleans(),
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
    "model": st.sampled_from([FUZZED, "", "x" * 300, "../" + FUZZED, FUZZED + "\x00"]),
}


@settings(
    max_examples=120, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(body=st.fixed_dictionaries({}, optional=field_values), chat=st.booleans())
def test_edge_values_of_every_field(fuzzed, store_users, body, chat):
    server, _witness = fuzzed
    if chat:
        prompt = body.pop("prompt", "hi")
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body.setdefault("prompt", "hi")
    body.setdefault("model", FUZZED)
    headers = {"Authorization": f"Bearer {store_users.keys[FUZZED]}", "Content-Type": "application/json"}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    started = time.monotonic()
    answer = httpx.post(f"{server.url}{path}", content=encode(body), headers=headers, timeout=TIMEOUT)
    check(server, answer, started)
    if body.get("stream") and answer.status_code == 200:
        assert answer.text.rstrip().endswith("data: [DONE]")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
