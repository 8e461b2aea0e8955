"""Every command line the README and docs/ show names a real command and real flags of it, so a reader can
run what they read (the README's Python example runs in test_readme.py)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from tailorlm.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAM = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:\.venv/bin/)?tailorlm\s")  # env settings, then the program


def command_lines(page: Path) -> list[str]:
    """Lines of the page's code blocks that run tailorlm (after any VAR=value settings)."""
    lines, fenced = [], False
    text = page.read_text(encoding="utf-8").replace("\\\n", " ")  # continued lines are one command
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced and PROGRAM.match(line.strip()):
            lines.append(line.strip())
    return lines


def check(line: str, root) -> None:
    words = shlex.split(line, comments=True)
    words = words[next(i for i, w in enumerate(words) if "=" not in w and w.endswith("tailorlm")) + 1 :]
    command = root
    while hasattr(command, "commands") and words and not words[0].startswith("-"):  # a group (typer's click)
        name = words.pop(0)
        assert name in command.commands, f"{line!r}: no command {name!r} (has {sorted(command.commands)})"
        command = command.commands[name]
    known = {"--help"}
    for param in command.params:
        known.update(getattr(param, "opts", ()), getattr(param, "secondary_opts", ()))
    for word in words:
        if word.startswith("-") and word != "-":
            flag = word.split("=", 1)[0]
            assert flag in known, f"{line!r}: {command.name} has no {flag} (has {sorted(known)})"


PAGES_WITH_COMMANDS = [page for page in PAGES if command_lines(page)]


@pytest.mark.parametrize("page", PAGES_WITH_COMMANDS, ids=[p.name for p in PAGES_WITH_COMMANDS])
def test_every_command_line_names_a_real_command_and_flags(page):
    root = typer.main.get_command(app)
    for line in command_lines(page):
        check(line, root)


def test_the_docs_show_commands_and_link_each_other():
    assert sum(len(command_lines(page)) for page in PAGES) >= 20
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, f"the README does not lead to {page.name}"
    for page in PAGES:
        for target in re.findall(r"\]\(((?:docs/)?[\w-]+\.md)\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links to a missing {target}"


def test_a_wrong_flag_is_caught():
    root = typer.main.get_command(app)
    with pytest.raises(AssertionError, match="no --not-a-flag"):
        check("tailorlm bench --task verbagg --not-a-flag 3", root)
    with pytest.raises(AssertionError, match="no command"):
        check(".venv/bin/tailorlm nonsense", root)
