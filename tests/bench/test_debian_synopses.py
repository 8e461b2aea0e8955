"""The LaMP-5-style folder made from Debian's indexes (``debian_synopses.py``): people only, one package
per source, the questions are each maintainer's own, and tailorlm's LaMP loader reads it as it wrote it."""

from __future__ import annotations

from debian_synopses import MIN_SOURCES, packages_by_maintainer, write_folder

from tailorlm.data import load_task

PERSON = "Ann Example <ann@debian.org>"
TEAM = "Debian Games Team <pkg-games-devel@lists.alioth.debian.org>"


def _indexes(tmp_path, sources: int):
    packages, translations = [], []
    for number in range(sources):
        for binary, maintainer in ((f"tool{number}", PERSON), (f"game{number}", TEAM)):
            md5 = f"{binary}-md5"
            packages.append(f"Package: {binary}\nMaintainer: {maintainer}\nDescription-md5: {md5}\n")
            translations.append(
                f"Package: {binary}\nDescription-md5: {md5}\nDescription-en: {binary} synopsis\n"
                f" The long description of {binary}, in more than eight words here.\n .\n Second paragraph.\n"
            )
    # A -dev binary of the same source with another synopsis: the binary named as the source is kept.
    packages.append(f"Package: tool0-dev\nSource: tool0 (1.0)\nMaintainer: {PERSON}\nDescription-md5: dev\n")
    translations.append(
        "Package: tool0-dev\nDescription-md5: dev\nDescription-en: headers\n Headers of tool0.\n"
    )
    (tmp_path / "Packages").write_text("\n".join(packages))
    (tmp_path / "Translation-en").write_text("\n".join(translations))
    return tmp_path / "Packages", tmp_path / "Translation-en"


def test_people_with_enough_sources_become_users_with_their_own_questions(tmp_path):
    found = packages_by_maintainer(*_indexes(tmp_path, MIN_SOURCES))
    assert list(found) == [PERSON]  # the team is no person
    sources = {source: (synopsis, body) for source, synopsis, body in found[PERSON]}
    assert len(sources) == MIN_SOURCES and sources["tool0"][0] == "tool0 synopsis"
    assert (
        sources["tool0"][1]
        == "The long description of tool0, in more than eight words here. Second paragraph."
    )
    assert packages_by_maintainer(*_indexes(tmp_path, MIN_SOURCES - 1)) == {}

    assert write_folder(found, tmp_path / "lamp", questions=3, profile=5) == (1, 3)
    task = load_task("lamp:5", data_dir=tmp_path / "lamp", split="dev")
    (user,) = task.users
    assert len(user.test) == 3 and len(user.history) == 5 and len(task.training_examples(user)) == 5
    asked = {e.target for e in user.test}
    assert asked <= {s for s, _ in sources.values()} and not asked & {h.fields["title"] for h in user.history}
    assert all(
        e.text.startswith("Generate a title for the following abstract of a paper: ") for e in user.test
    )
