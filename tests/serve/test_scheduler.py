"""One scheduler protocol (``JobScheduler``): it names exactly what the HTTP front calls on a scheduler,
and every scheduler the front can run over (tailorlm's own, the Ray front's, the load tests' baselines)
has each of its methods with the same parameters and types."""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

import pytest

from tailorlm.cluster.serving import RemoteScheduler
from tailorlm.perf.serve import BareScheduler
from tailorlm.perf.serve_peft import PeftScheduler
from tailorlm.serve import scheduler as scheduler_module
from tailorlm.serve.scheduler import JobQueue, JobScheduler, Scheduler

MEMBERS = ("start", "stop", "submit", "cancel", "pending", "forget", "stalled_for")


def mismatches(cls: type) -> list[str]:
    """The protocol's methods that ``cls`` lacks or has with other parameters or types."""
    found = []
    for name in MEMBERS:
        method = getattr(cls, name, None)
        if method is None:
            found.append(f"{name}: missing")
            continue
        wanted = getattr(JobScheduler, name)
        if list(inspect.signature(method).parameters) != list(inspect.signature(wanted).parameters):
            found.append(f"{name}: parameters {inspect.signature(method)}")
        elif typing.get_type_hints(method) != typing.get_type_hints(wanted):
            found.append(f"{name}: types {typing.get_type_hints(method)}")
    return found


FRONT_FILES = ("app.py", "users_api.py", "server.py", "run.py")  # the HTTP layer's files in serve/


def front_calls() -> set[str]:
    """The methods the HTTP layer calls on a scheduler (``<anything>.scheduler.<method>(...)``)."""
    called = set()
    for name in FRONT_FILES:
        tree = ast.parse((Path(scheduler_module.__file__).parent / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            func = node.func if isinstance(node, ast.Call) else None
            on = getattr(func, "value", None)
            if isinstance(func, ast.Attribute) and isinstance(on, ast.Attribute) and on.attr == "scheduler":
                called.add(func.attr)
    return called


def test_the_protocol_names_what_the_front_calls():
    assert {name for name in vars(JobScheduler) if not name.startswith("_")} == set(MEMBERS)
    assert front_calls() == set(MEMBERS)


@pytest.mark.parametrize("cls", [Scheduler, RemoteScheduler, PeftScheduler, BareScheduler])
def test_every_scheduler_satisfies_the_protocol(cls):
    assert mismatches(cls) == []


def test_a_scheduler_missing_a_method_is_caught():
    assert mismatches(JobQueue) == ["forget: missing"]  # the shared base; its subclasses add forget

    class Renamed(Scheduler):
        def forget(self, user: str) -> int:  # another parameter name: a keyword call would fail
            return 0

    assert mismatches(Renamed) == ["forget: parameters (self, user: 'str') -> 'int'"]
