"""Commands about tasks and data: ``data list``, ``data show TASK``, and ``score`` for LaMP predictions."""

from __future__ import annotations

from pathlib import Path

import typer

from tailorlm.cli import app, console
from tailorlm.cli.common import JSON_OPTION, user_errors
from tailorlm.data import DataError, UnknownTaskError, available_tasks, load_task, specs

data_app = typer.Typer(
    help="Tasks and their data: list the known tasks, show figures about one.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

DATA_OPTION = typer.Option(
    None, "--data", "-d", help="Folder with the task's files (PEFT-U and LaMP tasks; not for offline tasks)."
)
SPLIT_OPTION = typer.Option(
    None,
    "--split",
    help="LaMP: train / dev (default) / test files. PEFT-U: leaked (default) / no_leak. Offline tasks and "
    "tables: items (a share of the items held out for every user).",
)
SEED_OPTION = typer.Option(0, "--seed", help="Seed of the per-user splits the offline tasks make.")


@data_app.command("list")
def list_command(as_json: bool = JSON_OPTION) -> None:
    """Every task name that `data show` and the benchmark accept."""
    rows = [
        {
            "name": spec.name,
            "family": spec.family,
            "kind": spec.kind,
            "labels": len(spec.labels) if spec.labels is not None else None,
            "needs_data": spec.needs_data,
            "description": spec.description,
        }
        for spec in (specs.spec(name) for name in available_tasks())
    ]

    def render(payload: dict) -> None:
        columns = ["task", "kind", "labels", "data", "what"]
        lines = [
            (
                t["name"],
                t["kind"],
                t["labels"],
                "--data DIR" if t["needs_data"] else "installed",
                t["description"],
            )
            for t in payload["tasks"]
        ]
        console.out.print(console.table(None, columns, lines))

    console.emit({"tasks": rows}, as_json, render)


@data_app.command("show")
def show_command(
    task: str = typer.Argument(
        ..., help="Task name, e.g. verbagg, peftu:hatexplain, lamp:2 (see `data list`)."
    ),
    data: Path | None = DATA_OPTION,
    split: str | None = SPLIT_OPTION,
    seed: int = SEED_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Users, items per user, label distribution and how often users disagree with the majority."""
    from tailorlm.data import stats

    with user_errors(DataError, UnknownTaskError):
        loaded = load_task(task, data_dir=data, split=split, seed=seed)
    console.emit(stats.summarize(loaded), as_json, _render_summary)


def _render_summary(s: dict) -> None:
    say = console.out.print
    say(f"[bold]{s['task']}[/] ({s['kind']}): {s['description']}")
    say(f"source: {s['source']}", highlight=False)
    splits = ", ".join(f"{name} {count:,}" for name, count in s["splits"].items())
    say(f"users: {s['users']:,}   examples: {s['examples']:,} ({splits})")
    if s["distinct_items"]:
        say(f"distinct items: {s['distinct_items']:,}")
    for title, key in (("examples per user", "examples_per_user"), ("history per user", "history_per_user")):
        d = s[key]
        say(f"{title}: median {console.fmt(d['median'])}, min {d['min']:,}, max {d['max']:,}")
    if s["label_distribution"]:
        total = sum(s["label_distribution"].values())
        rows = [(label, f"{n:,}", f"{n / total:.1%}") for label, n in s["label_distribution"].items()]
        say(console.table("labels", ["label", "count", "share"], rows))
    if s["disagreement"]:
        d = s["disagreement"]
        say(
            f"disagreement: {d['rate']:.1%} of {d['answers']:,} answers to {d['items']:,} shared items "
            "differ from the item's majority answer"
        )
    say(f"metrics: {', '.join(s['metrics'])}")


@app.command("score")
def score_command(
    golds: Path = typer.Option(..., "--golds", help="LaMP outputs file with the gold answers."),
    preds: Path = typer.Option(
        ..., "--preds", help="Predictions in the same format (task, golds: [id, output])."
    ),
    questions: Path | None = typer.Option(
        None, "--questions", help="The questions file, to group time-based questions by user_id."
    ),
    stemmer: bool = typer.Option(
        False, "--stemmer/--no-stemmer", help="Stem words for ROUGE (LaMP does not)."
    ),
    resamples: int = typer.Option(1000, "--resamples", min=1, help="Bootstrap resamples for the intervals."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Score a LaMP predictions file the way LaMP's own evaluation does (the task is read from the golds)."""
    from tailorlm import metrics
    from tailorlm.data import lamp

    with user_errors(DataError):
        result = lamp.score_files(golds, preds, questions, stemmer=stemmer)
    result["ci95"] = {
        name: metrics.bootstrap_ci(values, n_resamples=resamples)
        for name, values in result["per_user"].items()
    }
    payload = {k: v for k, v in result.items() if k != "per_user"}

    def render(p: dict) -> None:
        console.out.print(f"{p['task']} ({p['spec']}): {p['n_examples']:,} questions, {p['n_users']:,} users")
        rows = [
            (
                name,
                p["pooled"][name],
                p["user_mean"][name],
                f"{p['ci95'][name][0]:.4g} - {p['ci95'][name][1]:.4g}",
            )
            for name in p["metrics"]
        ]
        console.out.print(console.table(None, ["metric", "pooled", "per-user mean", "95% CI (users)"], rows))

    console.emit(payload, as_json, render)
