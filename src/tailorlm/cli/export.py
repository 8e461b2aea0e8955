"""``tailorlm export``: users' LoRA modules in the layout vLLM and LoRAX load, with the command that serves
them."""

from __future__ import annotations

from pathlib import Path

import typer

from tailorlm import settings
from tailorlm.cli import app, console
from tailorlm.cli.common import JSON_OPTION, user_errors
from tailorlm.cli.users import STORE_ERRORS, STORE_OPTION
from tailorlm.store.module_folder import ModuleFileError
from tailorlm.store.store import ModuleStore
from tailorlm.users.errors import UserError
from tailorlm.users.export import FORMATS, commands, export_users


@app.command("export")
def export_command(
    users: list[str] = typer.Argument(..., help="The users whose current LoRA module to export."),
    format: str = typer.Option("vllm", "--format", help=f"Server to export for: {', '.join(FORMATS)}."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write one adapter folder per user into."),
    served: str | None = typer.Option(
        None, "--served-name", help="The base model's name on the GPU server (default: its hub name)."
    ),
    store: str | None = STORE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Write users' LoRA modules as PEFT LoRA folders vLLM and LoRAX load, checked against their rules, and
    print the command that serves them. Other kinds are refused with the reason."""
    with user_errors(*STORE_ERRORS, ModuleFileError):
        if format not in FORMATS:
            raise UserError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
        modules = ModuleStore(store or settings.default_store())
        if not modules.users():
            raise UserError(f"no trained users in {modules.location}")
        exported = export_users(modules, users, out, served)
        name = exported[0].served
        command = commands(exported, name)[format]
    payload = {
        "format": format,
        "served_name": name,
        "users": [{"user": e.user_id, "folder": str(e.folder), "rank": e.rank} for e in exported],
        "command": command,
    }

    def render(p: dict) -> None:
        console.out.print(f"exported {len(p['users'])} users for {p['format']} into {out}", highlight=False)
        console.out.print(p["command"], highlight=False, markup=False, soft_wrap=True)

    console.emit(payload, as_json, render)
