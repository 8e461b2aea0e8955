"""A LaMP-5-style folder with real per-user signal, made at run time from Debian's archive indexes, never
committed: each user is a Debian maintainer (a person, not a team), each "paper" one of their source
packages, its "abstract" the package's long description and its "title" the one-line synopsis the
maintainer wrote for it. A maintainer's synopses share their own habits (a trailing "- library", "for
Python 3", a house vocabulary), the way an author's titles do; guessing the maintainer from a synopsis
alone is right about 26% of the time against 0.6% by chance.

The time-based form: every user has ``--questions`` questions (their last packages in a seeded random
order; the archive gives no dates) that share one profile, the user's other packages (at most
``--profile``), so a user's module trains on exactly what every question of theirs may see.

Inputs, both from the Debian mirror the machine's apt already uses (Translation-en is checked against
the Release file apt verified; both are public indexes, not packages):

    lz4cat /var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4 > Packages
    curl -O http://deb.debian.org/debian/dists/bookworm/main/i18n/Translation-en.xz && xz -d Translation-en.xz
    python tests/bench/debian_synopses.py Packages Translation-en OUT_DIR

then ``tailorlm bench --task lamp:5 --data OUT_DIR --split dev ...`` (the commands are in
docs/benchmark-results.md).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

# A maintainer field naming a group, not a person (teams, lists, the QA group).
GROUP = re.compile(
    r"team|maintainers|group|project|packagers|developers|mailing|lists\.|alioth|packages\.debian|tracker\.debian",
    re.I,
)
MIN_SOURCES = 12  # packages per maintainer: the questions plus a profile worth training on
MAX_WORDS = 150  # an abstract's length in LaMP-5 is about 150-220 words


def stanzas(path: Path) -> Iterator[dict[str, str]]:
    """The deb822 paragraphs of an index: a field's continuation lines are kept, one per line."""
    fields: dict[str, str] = {}
    name = ""
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            line = line.rstrip("\n")
            if not line:
                if fields:
                    yield fields
                fields, name = {}, ""
            elif line[0] in " \t" and name:
                fields[name] += "\n" + line[1:]
            elif ":" in line:
                name, value = line.split(":", 1)
                fields[name] = value.strip()
    if fields:
        yield fields


def long_text(description: str) -> str:
    """A long description (the lines after the synopsis) as plain words: ``.`` lines are paragraph breaks."""
    lines = [line.strip() for line in description.split("\n")[1:]]
    words = " ".join(line for line in lines if line != ".").split()
    return " ".join(words[:MAX_WORDS])


def packages_by_maintainer(packages: Path, translations: Path) -> dict[str, list[tuple[str, str, str]]]:
    """Per individual maintainer, one ``(source, synopsis, long description)`` per source package: the
    binary named as its source when there is one, else the first by name."""
    descriptions = {}
    for stanza in stanzas(translations):
        text = stanza.get("Description-en", "")
        if "Description-md5" in stanza and "\n" in text:
            descriptions[stanza["Description-md5"]] = text
    chosen: dict[tuple[str, str], tuple[str, str]] = {}
    for stanza in stanzas(packages):
        maintainer = stanza.get("Maintainer", "")
        text = descriptions.get(stanza.get("Description-md5", ""))
        if not text or GROUP.search(maintainer):
            continue
        source = stanza.get("Source", stanza["Package"]).split(" ")[0]
        rank = (stanza["Package"] != source, stanza["Package"])
        key = (maintainer, source)
        if key not in chosen or rank < chosen[key][0]:
            chosen[key] = (rank, text)
    found: dict[str, list[tuple[str, str, str]]] = {}
    for (maintainer, source), (_, text) in sorted(chosen.items()):
        synopsis, body = text.split("\n", 1)[0].strip(), long_text(text)
        if synopsis and len(body.split()) >= 8:
            found.setdefault(maintainer, []).append((source, synopsis, body))
    return {m: items for m, items in found.items() if len(items) >= MIN_SOURCES}


def write_folder(
    found: dict[str, list[tuple[str, str, str]]], out: Path, questions: int, profile: int, seed: int = 0
) -> tuple[int, int]:
    """Writes ``dev_questions.json`` and ``dev_outputs.json``; returns (users, questions)."""
    rng = random.Random(seed)
    rows, golds = [], []
    for number, maintainer in enumerate(sorted(found)):
        items = list(found[maintainer])
        rng.shuffle(items)
        asked, known = items[-questions:], items[:-questions][-profile:]
        shared = [{"id": f"{number}-{src}", "title": title, "abstract": body} for src, title, body in known]
        for source, synopsis, body in asked:
            qid = f"{number}-q-{source}"
            prompt = "Generate a title for the following abstract of a paper: " + body
            rows.append({"id": qid, "input": prompt, "profile": shared, "user_id": f"m{number}"})
            golds.append({"id": qid, "output": synopsis})
    out.mkdir(parents=True, exist_ok=True)
    (out / "dev_questions.json").write_text(json.dumps(rows))
    (out / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_5", "golds": golds}))
    return len(found), len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", type=Path, help="a binary Packages index (uncompressed)")
    parser.add_argument("translations", type=Path, help="the matching Translation-en (uncompressed)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--questions", type=int, default=3, help="test questions per maintainer")
    parser.add_argument("--profile", type=int, default=30, help="at most this many profile packages")
    args = parser.parse_args()
    users, asked = write_folder(
        packages_by_maintainer(args.packages, args.translations), args.out, args.questions, args.profile
    )
    print(f"{users} maintainers, {asked} questions -> {args.out}")


if __name__ == "__main__":
    main()
