"""``tailorlm serve``: the demo store's printed examples work as printed, and mistakes are one-line errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from tailorlm.cli import app
from tailorlm.serve.run import free_port, wait_healthy


def test_demo_examples_work_as_printed(tmp_path):
    port = free_port()
    command = [
        sys.executable, "-m", "tailorlm.cli", "serve", "--demo", "2", "--model", "tiny",
        "--store", str(tmp_path / "store"), "--port", str(port),
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 240
        while not any(line.startswith(".venv/bin/python") for line in lines):
            assert time.monotonic() < deadline and server.poll() is None, server.stderr.read()[-2000:]
            lines.append(server.stdout.readline().rstrip("\n"))
        # The examples are printed just before the server binds: wait until it answers (a loaded machine
        # can take seconds to get there).
        wait_healthy(f"http://127.0.0.1:{port}", alive=lambda: server.poll() is None, timeout=120)
        curls = [line for line in lines if line.startswith("curl ")]
        assert len(curls) == 2
        chat = json.loads(
            subprocess.run(["bash", "-c", curls[0]], capture_output=True, text=True, check=True).stdout
        )
        assert chat["object"] == "chat.completion"
        labelled = json.loads(
            subprocess.run(["bash", "-c", curls[1]], capture_output=True, text=True, check=True).stdout
        )
        scores = labelled["choices"][0]["label_scores"]
        assert labelled["choices"][0]["text"] == max(scores, key=scores.get)
        program = next(line for line in lines if line.startswith(".venv/bin/python"))
        answer = subprocess.run(
            ["bash", "-c", program.replace(".venv/bin/python", sys.executable, 1)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert answer.returncode == 0, answer.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_taken_port_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--store", str(tmp_path / "s"), "--port", str(port)])
    assert result.exit_code == 2
    assert "cannot listen" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "options, message",
    [(["--kind", "nonsense"], "nonsense"), (["--recipe", "magic"], "recipe"), (["--slots", "1"], "slots")],
)
def test_bad_options_are_clear_errors(tmp_path, options, message):
    result = CliRunner().invoke(
        app, ["serve", "--store", str(tmp_path / "s"), "--port", str(free_port()), *options]
    )
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_the_help_keeps_the_extras_name():
    """Rich reads "[ray]" as markup unless escaped; the help must say what to install."""
    from typer.testing import CliRunner

    from tailorlm.cli import app

    for command in (["serve", "--help"], ["users", "train", "--help"]):
        shown = CliRunner().invoke(app, command, env={"COLUMNS": "300"})
        assert shown.exit_code == 0 and "pip install tailorlm[ray]" in shown.output, shown.output[-500:]
