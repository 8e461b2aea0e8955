"""Side by side in one run: the trainer's passes cut by rows alone (16 rows, as before) against rows and
padded tokens (``TrainConfig.micro_batch_tokens``), on real training rows of a task, 8 users x 8 rows, one
epoch, batch 4, the rounds alternating. Not a test (timing belongs in benchmarks, not the suite):

    python tests/train/passes_side_by_side.py verbagg
    python tests/train/passes_side_by_side.py tate
    python tests/train/passes_side_by_side.py lamp:5 /tmp/estdata/lamp5   # tests/bench/estimate_data.py lamp5
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace

from tailorlm.bench.config import BenchConfig, split_users
from tailorlm.data import load_task
from tailorlm.engine.engine import Engine
from tailorlm.methods.deps import MethodDeps, base_loader
from tailorlm.methods.recipes import Recipe
from tailorlm.methods.setups import TASK_ADAPTER, personal_job
from tailorlm.train.trainer import MultiUserTrainer, TrainConfig

USERS, ROWS, ROUNDS = 8, 8, 3


def main(task_name: str, data_dir: str | None) -> None:
    config = BenchConfig()
    task = load_task(task_name, data_dir=data_dir, seed=0)
    test, adapter = split_users(task, replace(config, test_users=None))[0], []
    settings = config.method_settings()
    deps = MethodDeps(task, base_loader(None), "/tmp/passes-side-by-side", settings, adapter_users=adapter)
    engine = Engine(deps.load_base(), TASK_ADAPTER.spec, slots=USERS + 1, max_length=settings.max_length)
    builder = deps.builder(Recipe(), engine.tokenizer)
    jobs = []
    for user in [u for u in test if len(task.training_examples(u)) >= ROWS][:USERS]:
        job = personal_job(deps, builder, "side-by-side", user)
        jobs.append(replace(job, train=job.train[:ROWS], val=[]))
    base = TrainConfig(epochs=1, batch_size=4, learning_rate=1e-4, users_per_step=USERS)
    contenders = {"rows only (16)": replace(base, micro_batch_tokens=10**9), "rows and tokens": base}
    MultiUserTrainer(engine, base).run(jobs[:1])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for index in range(ROUNDS):
        for name in list(contenders)[:: 1 if index % 2 == 0 else -1]:
            started = time.perf_counter()
            MultiUserTrainer(engine, contenders[name]).run(jobs)
            seconds[name].append(time.perf_counter() - started)
    rows = sum(len(job.train) for job in jobs)
    rate = {name: rows / statistics.median(values) for name, values in seconds.items()}
    for name, values in seconds.items():
        print(f"{task_name}: {name}: {' '.join(f'{s:.1f}' for s in values)} s, {rate[name]:.2f} rows/s")
    before, after = rate["rows only (16)"], rate["rows and tokens"]
    print(f"{task_name}: {len(jobs)} users x {ROWS} rows: rows and tokens / rows only {after / before:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
