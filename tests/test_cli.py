"""The ``fabric`` command line: help, argument errors, exit codes and output formatting.

Help and usage errors run the installed console script in a subprocess (what a user runs);
output formatting runs ``main()`` in-process with the SDK's site calls replaced, so no site is
started here (the end-to-end tests do that).
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric.cli.main import main
from fabric.cli.progress import StatusSpinner
from fabric.client.fabric import Fabric
from fabric.client.streaming import Stream
from fabric.errors import EndpointError, UnknownModel

FABRIC = str(Path(sys.executable).with_name("fabric"))
MY_COMMANDS = ("generate", "chat", "embed", "models", "deploy", "deployments", "undeploy")


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FABRIC, *args], capture_output=True, text=True, input=stdin,
                          timeout=120)


# -- help and usage (subprocess) ---------------------------------------------------------------

def test_top_level_help_lists_commands_and_examples() -> None:
    out = run("--help")
    assert out.returncode == 0, out.stderr
    for command in MY_COMMANDS:
        assert f"\n    {command}" in out.stdout
    assert "examples:" in out.stdout and 'fabric generate "The mitochondria is"' in out.stdout


@pytest.mark.parametrize("command", MY_COMMANDS)
def test_command_help(command: str) -> None:
    out = run(command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: fabric {command}")
    assert "--site" in out.stdout


def test_no_command_prints_usage() -> None:
    out = run()
    assert out.returncode == 2 and "usage: fabric" in out.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["generate"], "the following arguments are required: PROMPT"),
    (["generate", "hi", "--max-tokens", "many"], "argument -n/--max-tokens: invalid int value"),
    (["embed"], "the following arguments are required: TEXT"),
    (["deploy", "smollm2-135m", "--pp", "two"], "argument --pp: invalid int value"),
    (["undeploy"], "the following arguments are required: ID"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
])
def test_argument_errors(args: list[str], message: str) -> None:
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["generate", ""], "error: prompt is empty: give at least one non-blank character\n"),
    (["generate", "hi", "--max-tokens", "0"], "error: max_tokens must be positive, got 0\n"),
    (["generate", "hi", "-t", "-1"], "error: temperature must be in [0.0, 100.0], got -1.0\n"),
    (["generate", "hi", "--top-p", "0"], "error: top_p must be in (0.0, 1.0], got 0.0\n"),
    (["embed", "ok", " "], "error: texts[1] is empty: give at least one non-blank character\n"),
    (["deploy", "smollm2-135m", "--pp", "0"], "error: pp must be positive, got 0\n"),
])
def test_bad_requests_exit_2_without_traceback(args: list[str], message: str) -> None:
    out = run(*args)
    assert (out.returncode, out.stderr, out.stdout) == (2, message, "")


def test_generate_reads_prompt_from_stdin() -> None:
    out = run("generate", "-", stdin="   \n")
    assert out.returncode == 2 and out.stderr.startswith("error: prompt is empty")


# -- in-process: output and error mapping -----------------------------------------------------

class ListSource:
    request_id = "r1"

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.cancelled = False

    def events(self) -> Iterator[dict[str, Any]]:
        for text in self.texts:
            yield {"op": "event", "token_ids": [1], "text": text}
        yield {"op": "done", "result": {
            "request_id": "r1", "model": {"name": "m", "version": "1", "sha256": "0" * 64},
            "text": "".join(self.texts), "token_ids": [1] * len(self.texts),
            "finish_reason": "length",
            "usage": {"prompt_tokens": 1, "completion_tokens": len(self.texts)},
            "timings": {}}}

    def cancel(self) -> str:
        self.cancelled = True
        return "running"

    def close(self) -> None:
        pass

    def abandon(self) -> None:
        self.cancelled = True


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the SDK's site calls; records each call's arguments."""
    log: list[dict[str, Any]] = []

    def stream(self: Fabric, prompt: str | None = None, **kw: Any) -> Stream:
        log.append({"prompt": prompt, **kw, "messages": [dict(m) for m in kw.get("messages")
                                                        or []]})
        return Stream(ListSource(["Hello", ",", " world"]))

    monkeypatch.setattr(Fabric, "stream", stream)
    monkeypatch.setattr(Fabric, "models", lambda self: [
        {"name": "smollm2-135m", "version": "v1", "family": "causal-lm", "size": "135M",
         "plan": {"pp": 1, "tp": 1}, "hosted": True, "site": "local",
         "deployments": [{"id": "d-1", "state": "ready"}]},
        {"name": "minilm-l6", "version": "v2", "family": "embedding", "params": 22_713_216,
         "plan": None, "hosted": True, "site": "local", "deployments": []}])
    monkeypatch.setattr(Fabric, "deployments", lambda self: [
        {"id": "d-1", "model": "smollm2-135m", "plan": {"pp": 2, "tp": 1}, "job_id": "42",
         "state": "ready", "address": "tcp://127.0.0.1:5000", "idle_s": 3.2}])
    return log


def test_generate_streams_text(calls: list[dict[str, Any]],
                               capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["generate", "The sky", "-n", "3", "--stop", "\\n", "--seed", "7", "--stats"])
    out = capsys.readouterr()
    assert rc == 0 and out.out == "Hello, world\n"
    assert "finish=length" in out.err
    assert calls[0]["prompt"] == "The sky" and calls[0]["max_tokens"] == 3
    assert calls[0]["stop"] == ["\n"] and calls[0]["seed"] == 7


def test_stop_texts_keep_their_letters_when_they_hold_an_escape(
        calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    """``--stop`` takes the shell-friendly escapes (\\n, \\t) without mangling the rest of the
    text: "Schluß\\n" stops at "Schluß" and a newline, not at UTF-8 bytes read as Latin-1."""
    rc = main(["generate", "x", "--stop", "Schluß\\n", "--stop", "→\\t", "--stop", "ß",
               "--stop", "a\\\\b"])
    assert rc == 0 and capsys.readouterr().out == "Hello, world\n"
    assert calls[0]["stop"] == ["Schluß\n", "→\t", "ß", "a\\b"]


def test_chat_keeps_history(calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi there\n\nand again\n/reset\nfresh\n/exit\n"
                                                  "never sent\n"))
    rc = main(["chat", "--system", "be brief"])
    assert rc == 0 and capsys.readouterr().out == "Hello, world\n" * 3
    assert [m["content"] for m in calls[1]["messages"]] == [
        "be brief", "hi there", "Hello, world", "and again"]
    assert [m["role"] for m in calls[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert [m["content"] for m in calls[2]["messages"]] == ["be brief", "fresh"]
    assert len(calls) == 3


def test_models_and_deployments_tables(calls: list[dict[str, Any]],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "FAMILY", "SIZE", "DISK", "SHA256", "PLAN",
                                "SERVED"]
    assert lines[1].split()[:4] == ["smollm2-135m", "v1", "causal-lm", "135M"]
    assert "d-1 ready" in lines[1] and "22.7M" in lines[2] and "on demand" in lines[2]
    assert main(["deployments"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["d-1", "smollm2-135m", "pp=2", "tp=1", "42", "ready",
                                "tcp://127.0.0.1:5000", "3s"]


def test_typed_errors_map_to_exit_codes(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    def unknown(self: Fabric, *a: Any, **kw: Any) -> Any:
        raise UnknownModel("unknown model 'gpt-9'; available: minilm-l6, smollm2-135m")

    def down(self: Fabric, *a: Any, **kw: Any) -> Any:
        raise EndpointError("the local site exited (code 1) before it was ready: boom")

    monkeypatch.setattr(Fabric, "stream", unknown)
    assert main(["generate", "hi", "-m", "gpt-9"]) == 2
    assert capsys.readouterr().err == \
        "error: unknown model 'gpt-9'; available: minilm-l6, smollm2-135m\n"
    monkeypatch.setattr(Fabric, "models", down)
    assert main(["models"]) == 1
    assert capsys.readouterr().err.startswith("error: the local site exited (code 1)")


def test_spinner_without_terminal_prints_each_change_once() -> None:
    buf = io.StringIO()
    with StatusSpinner("waiting for m", stream=buf) as spinner:
        spinner.update({"state": "absent"})
        spinner.update({"state": "queued", "queue_position": 2, "job_id": "7"})
        spinner.update({"state": "queued", "queue_position": 2, "job_id": "7"})
        spinner.update({"state": "loading", "job_id": "7"})
        spinner.stop()
        spinner.update({"state": "ready"})
    assert buf.getvalue().splitlines() == [
        "waiting for m: launching a model server",
        "waiting for m: queued in the batch scheduler, position 2 (job 7)",
        "waiting for m: loading the model (job 7)",
    ]

