"""One benchmark run on disk, the one owner of its layout:

- ``run.json``: the task, the config, the methods, the test users, and the identity a resumed run must
  match (``RunFolderError`` otherwise);
- ``predictions/<method>.jsonl``: one line per user, appended the moment the user is answered, so a killed
  run resumes with the users that have no line yet;
- ``modules/``: the module stores of the methods that train (``MethodDeps.modules``);
- ``profiles.json``: the PAG profiles written so far;
- ``lamp/<method>.json``: predictions in LaMP's outputs format (written by the runner for LaMP tasks);
- ``failures.json``: the methods that failed while running, each with its one-line reason and traceback
  (cleared when a resumed run finishes the method);
- ``timing.json``: the work estimate per method (``bench.budget``) and the seconds each method then took.

``results.json`` and the report, read from these, belong to ``bench.results`` and ``bench.report``.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from tailorlm.bench.config import BenchConfig
from tailorlm.bench.results import FAILURES_FILE, PREDICTIONS_DIR, RUN_FILE, TIMING_FILE
from tailorlm.data.schema import Task, User
from tailorlm.files import atomic_write_text, json_text


class RunFolderError(ValueError):
    """The output folder holds a different run (other task, seed or users) than the one asked for."""


class RunFolder:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def modules(self) -> Path:
        return self.root / "modules"

    @property
    def profiles(self) -> Path:
        return self.root / "profiles.json"

    @property
    def lamp(self) -> Path:
        return self.root / "lamp"

    def predictions(self, method_key: str) -> Path:
        return self.root / PREDICTIONS_DIR / f"{method_key}.jsonl"

    # ---- run.json ----------------------------------------------------------------------------------

    @staticmethod
    def identity(task: Task, config: BenchConfig, test_users: list[User]) -> dict:
        """What must match for a folder's stored results to be continued."""
        return {
            "task": task.name,
            "source": task.source,
            "seed": config.seed,
            "model": config.model,
            "test_users": [u.id for u in test_users],
        }

    def recorded_config(self) -> dict | None:
        """The config a run already in this folder started with, or None."""
        path = self.root / RUN_FILE
        return json.loads(path.read_text()).get("config") if path.is_file() else None

    def write_run_file(
        self,
        task: Task,
        config: BenchConfig,
        test_users: list[User],
        adapter_users: list[User],
        methods: dict[str, dict],
        items_before_cap: dict[str, int] | None = None,
    ) -> None:
        """Record the run; refuses a folder that holds another run, adds to one that holds this run.
        ``items_before_cap``: the training items each user had before the run's cap cut them."""
        path = self.root / RUN_FILE
        identity = self.identity(task, config, test_users)
        previous = json.loads(path.read_text()) if path.is_file() else None
        if previous is not None and previous.get("identity") != identity:
            raise RunFolderError(
                f"{self.root} holds another run ({previous.get('identity', {}).get('task')}, "
                f"seed {previous.get('identity', {}).get('seed')}, or other users); "
                "choose another --out folder or delete this one"
            )
        record = {
            "task": {
                "name": task.name,
                "kind": task.kind,
                "labels": list(task.labels) if task.labels else None,
                "metrics": list(task.metrics),
                "source": task.source,
            },
            "config": asdict(config),
            "methods": {**(previous or {}).get("methods", {}), **methods},
            "users": {
                u.id: {
                    "history": len(u.history),
                    "train": len(task.training_examples(u)),
                    "val": len(u.val),
                    "test": len(u.test),
                    **(
                        {"train_before_cap": items_before_cap[u.id]}
                        if items_before_cap and u.id in items_before_cap
                        else {}
                    ),
                }
                for u in test_users
            },
            "adapter_users": len(adapter_users),
            "identity": identity,
            "started": (previous or {}).get("started") or datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))

    # ---- timing.json -------------------------------------------------------------------------------

    def _timing(self) -> dict:
        path = self.root / TIMING_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def record_estimate(
        self,
        per_method: dict[str, float],
        measure_seconds: float,
        cuts: dict[str, list],
        rates: dict | None = None,
    ) -> None:
        """The work estimate the run started with and the caps its budget changed (each [asked, fitted]);
        a resumed run keeps the first."""
        timing = self._timing()
        if "estimate" in timing:
            return
        timing.update(
            {"measure_seconds": measure_seconds, "estimate": per_method, "budget_cuts": cuts, "rates": rates}
        )
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / TIMING_FILE, json_text(timing) + "\n")

    def record_actual(self, method_key: str, seconds: float, users: int) -> None:
        """What ``method_key`` took in this process for ``users`` users (a resumed method: its rest)."""
        timing = self._timing()
        timing.setdefault("actual", {})[method_key] = {"seconds": seconds, "users": users}
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / TIMING_FILE, json_text(timing) + "\n")

    def record_run_seconds(self, seconds: float) -> None:
        """The whole run's wall time, measuring and scoring included."""
        timing = self._timing()
        timing["run_seconds"] = seconds
        atomic_write_text(self.root / TIMING_FILE, json_text(timing) + "\n")

    # ---- predictions -------------------------------------------------------------------------------

    def done_users(self, method_key: str) -> set[str]:
        """Users whose answers from ``method_key`` are stored."""
        path = self.predictions(method_key)
        if not path.is_file():
            return set()
        users = set()
        for line in path.read_text().splitlines():
            try:
                users.add(json.loads(line)["user"])
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by a kill: that user simply runs again
        return users

    def append(self, method_key: str, user: User, predictions: list[str], seconds: float) -> None:
        """Store one user's answers (one per test example) from ``method_key``."""
        if len(predictions) != len(user.test):
            raise RuntimeError(
                f"{method_key} gave {len(predictions)} answers for {len(user.test)} test items of {user.id}"
            )
        record = {
            "user": user.id,
            "seconds": seconds,
            "examples": [
                {"id": e.id, "gold": e.target, "golds": list(e.targets), "prediction": p}
                for e, p in zip(user.test, predictions, strict=True)
            ],
        }
        path = self.predictions(method_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_cut_line(path)
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def answers(self, method_key: str) -> dict[str, str]:
        """Every stored answer of ``method_key`` by example id (none for a method that failed before its
        first user)."""
        path = self.predictions(method_key)
        if not path.is_file():
            return {}
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {e["id"]: e["prediction"] for line in lines for e in line["examples"]}

    # ---- failures ----------------------------------------------------------------------------------

    def record_failure(self, method_key: str, error: BaseException) -> str:
        """Keep why ``method_key`` failed (one line for the report, the traceback for whoever debugs it);
        returns the line."""
        reason = one_line(error)
        failures = self._failures()
        failures[method_key] = {
            "reason": reason,
            "traceback": "".join(traceback.format_exception(error)),
        }
        atomic_write_text(self.root / FAILURES_FILE, json_text(failures) + "\n")
        return reason

    def clear_failure(self, method_key: str) -> None:
        """``method_key`` finished (a resumed run): its earlier failure no longer describes it."""
        failures = self._failures()
        if failures.pop(method_key, None) is not None:
            atomic_write_text(self.root / FAILURES_FILE, json_text(failures) + "\n")

    def _failures(self) -> dict:
        path = self.root / FAILURES_FILE
        return json.loads(path.read_text()) if path.is_file() else {}


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception as one line: its type and the first line of its message, cut at ``limit``."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _drop_cut_line(path: Path) -> None:
    """Cut off a last line a kill left unfinished, so the next line starts on its own (appended after
    it, both would be lost as one line of broken JSON)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("r+b") as handle:
        handle.seek(-1, 2)
        if handle.read(1) == b"\n":
            return  # the usual case: one byte read
        handle.seek(0)
        handle.truncate(handle.read().rfind(b"\n") + 1)
