"""``tailorlm export``: users' LoRA modules and the base they were trained over, in the layout vLLM and
LoRAX load, with the command that serves them."""

from __future__ import annotations

from pathlib import Path

import typer

from tailorlm import models, settings
from tailorlm.cli import app, console
from tailorlm.cli.common import JSON_OPTION, user_errors
from tailorlm.cli.users import STORE_ERRORS, STORE_OPTION
from tailorlm.store.module_folder import ModuleFileError
from tailorlm.users.errors import UserError
from tailorlm.users.export import FORMATS, MANIFEST_FILE, export_users, manifest
from tailorlm.users.service import UserService


@app.command("export")
def export_command(
    users: list[str] = typer.Argument(..., help="The users whose current LoRA module to export."),
    format: str = typer.Option(
        "vllm",
        "--format",
        help=f"Server to export for: {', '.join(FORMATS)} (gguf: llama.cpp's llama-server --lora files).",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="A new (or empty, or earlier export's) folder: base/ holds the base model the modules were "
        f"trained over, adapters/ one folder per user, {MANIFEST_FILE} who is served under which name.",
    ),
    served: str | None = typer.Option(
        None,
        "--served-name",
        help="Serve this base model (a hub id or a path; for gguf, a GGUF file) instead of writing the base: "
        "only for a copy of the very weights the modules were trained over (task adapter merged, except "
        "for gguf, which applies it as an adapter).",
    ),
    store: str | None = STORE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Write users' LoRA modules as PEFT LoRA folders vLLM and LoRAX load (or GGUF adapters for llama.cpp),
    checked against their rules and the base model, with that base beside them, and print the command
    that serves them. Other kinds are refused with the reason; a refused export writes nothing."""
    with user_errors(*STORE_ERRORS, ModuleFileError, models.ModelNotFoundError):
        service = UserService(store or settings.default_store(), device="cpu")
        if not service.store.users():
            raise UserError(f"no trained users in {service.location}")
        exported = export_users(service, users, out, served, format)
    payload = {"out": str(out), **manifest(exported)}
    payload["command"] = payload["commands"]["serve"]

    def render(p: dict) -> None:
        say = console.out.print
        say(f"exported {len(p['users'])} users for {p['format']} into {p['out']}", highlight=False)
        for user in p["users"]:
            if user["served_name"] != user["user"]:
                say(
                    f"user {user['user']!r} is served as {user['served_name']}", highlight=False, markup=False
                )
        say(p["command"], highlight=False, markup=False, soft_wrap=True)
        say("then, for the first user:", highlight=False)
        say(p["commands"]["request"], highlight=False, markup=False, soft_wrap=True)

    console.emit(payload, as_json, render)
