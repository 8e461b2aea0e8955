"""Commands about the installation itself: doctor, ask, where."""

from __future__ import annotations

import time

import typer

from tailorlm import doctor, models, settings
from tailorlm.cli import app, console
from tailorlm.cli.common import DEVICE_OPTION, DTYPE_OPTION, JSON_OPTION, MODEL_OPTION, user_errors
from tailorlm.device import DeviceError
from tailorlm.precision import DECODE


@app.command("doctor")
def doctor_command(
    as_json: bool = JSON_OPTION,
    load: bool = typer.Option(True, "--load/--no-load", help="Also load the default base model."),
) -> None:
    """Check Python, libraries, the base model, the cache folder, data packages, threads, and what
    --dtype auto picks here (with the measured figures)."""
    checks = doctor.run_checks(load_model=load)
    payload = doctor.as_payload(checks)

    def render(data: dict) -> None:
        for check in data["checks"]:
            mark = (
                "[green]ok[/]"
                if check["ok"]
                else ("[red]FAIL[/]" if check["required"] else "[yellow]warn[/]")
            )
            console.out.print(f"{mark:>14}  {check['name']:<22} {check['detail']}", highlight=False)
            if check["fix"]:
                console.out.print(f"{'':>6}  fix: {check['fix']}", highlight=False)

    console.emit(payload, as_json, render)
    if not payload["ok"]:
        raise typer.Exit(1)


@app.command("ask")
def ask_command(
    question: str = typer.Argument(..., help="What to ask the base model."),
    model: str | None = MODEL_OPTION,
    max_new_tokens: int = typer.Option(48, min=1, max=2048, help="Longest answer, in tokens."),
    device: str | None = DEVICE_OPTION,
    dtype: str | None = DTYPE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Ask the base model one question (greedy decoding, the model's chat template)."""
    from tailorlm.engine.generation import DecodeConfig, generate_texts

    with user_errors(models.ModelNotFoundError, DeviceError):
        started = time.perf_counter()
        # one prompt, one row: the small-batch decoding phase of --dtype auto
        base = models.load_base(model, device=device, dtype=dtype, phase=DECODE)
        loaded = time.perf_counter() - started
    prompt = models.chat_prompt(base.tokenizer, question)
    started = time.perf_counter()
    answer = generate_texts(
        base.model, base.tokenizer, [prompt], DecodeConfig(max_new_tokens=max_new_tokens)
    )[0]
    payload = {
        "model": base.name,
        "device": str(base.device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "dtype_reason": base.precision.reason if base.precision else "asked for",
        "question": question,
        "answer": answer,
        "load_seconds": loaded,
        "generate_seconds": time.perf_counter() - started,
    }
    console.emit(payload, as_json, lambda d: console.out.print(d["answer"], highlight=False))


@app.command("where")
def where_command(as_json: bool = JSON_OPTION) -> None:
    """Show the folders tailorlm reads and writes."""
    payload = {
        "home": settings.home(),
        "models": settings.models_dir(),
        "default_model_cache": models.default_cache_dir(),
        "default_model_gguf": models.gguf_path(),
    }
    console.emit(
        payload, as_json, lambda d: [console.out.print(f"{k:<20} {v}", highlight=False) for k, v in d.items()]
    )
