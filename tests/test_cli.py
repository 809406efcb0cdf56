"""The ``fabric`` command line: help, argument errors, exit codes and output formatting.

Help and usage errors run the installed console script in a subprocess (what a user runs);
output formatting runs ``main()`` in-process with the SDK's site calls replaced, so no site is
started here (the end-to-end tests do that).
"""

from __future__ import annotations

import io
import json
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


@pytest.mark.parametrize(("raised", "code", "stderr"), [
    ("KeyboardInterrupt()", 130, "interrupted\n"),  # Ctrl-C: the shell's 128 + SIGINT
    ("BrokenPipeError()", 0, ""),  # `fabric generate ... | head`: the reader left
])
def test_interrupt_and_a_closed_pipe_exit_as_a_shell_expects(raised: str, code: int,
                                                             stderr: str) -> None:
    script = ("import sys\nfrom fabric.client.fabric import Fabric\n"
              "from fabric.cli.main import main\n"
              f"def stream(self, *a, **kw):\n    raise {raised}\n"
              "Fabric.stream = stream\nsys.exit(main(['generate', 'hi']))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert (out.returncode, out.stderr) == (code, stderr)


def test_embed_deploy_and_listing_pass_every_option(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    got: list[dict[str, Any]] = []

    def embed(self: Fabric, texts: list[str], **kw: Any) -> Any:
        got.append(kw)
        return np.ones((len(texts), 3), dtype=np.float32)

    def deploy(self: Fabric, model: str, **kw: Any) -> dict[str, Any]:
        got.append(kw)
        return {"id": "d-9", "model": model, "state": "queued", "job_id": "77",
                "plan": {"pp": 1, "tp": 4, "ep": 2}}

    monkeypatch.setattr(Fabric, "embed", embed)
    monkeypatch.setattr(Fabric, "deploy", deploy)
    monkeypatch.setattr(Fabric, "deployments", lambda self: [
        {"id": "d-1", "model": "moe", "plan": {"pp": 1, "tp": 4, "ep": 4}, "job_id": "42",
         "state": "ready", "address": "tcp://h:1", "idle_s": 119.4},
        {"id": "d-2", "model": "moe", "plan": {"pp": 2, "tp": 1}, "job_id": "43",
         "state": "ready", "address": "tcp://h:2", "idle_s": 7200.0}])
    assert main(["embed", "a cat", "--no-normalize", "--layer", "2", "--pooling", "last"]) == 0
    assert got[-1]["normalize"] is False and got[-1]["layer"] == 2
    assert got[-1]["pooling"] == "last"
    assert main(["embed", "a cat"]) == 0 and got[-1]["normalize"] is True
    assert main(["deploy", "moe", "--tp", "4", "--ep", "2", "--no-wait"]) == 0
    assert {k: got[-1][k] for k in ("tp", "ep", "pp", "wait")} == {
        "tp": 4, "ep": 2, "pp": None, "wait": False}
    assert capsys.readouterr().out.splitlines()[-1] == \
        "deployment d-9: moe pp=1 tp=4 ep=2 queued (job 77)"
    assert main(["deployments"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[2:5] == ["pp=1", "tp=4", "ep=4"] and lines[1].split()[-1] == "119s"
    assert lines[2].split()[2:4] == ["pp=2", "tp=1"] and lines[2].split()[-1] == "120m"


def test_a_failed_chat_turn_is_forgotten(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """At a terminal a failed turn prints its error and the chat goes on without it."""
    sent: list[list[str]] = []

    def stream(self: Fabric, prompt: str | None = None, **kw: Any) -> Stream:
        sent.append([m["content"] for m in kw["messages"]])
        if len(sent) == 1:
            raise UnknownModel("unknown model 'x'")
        return Stream(ListSource(["ok"]))

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(Fabric, "stream", stream)
    monkeypatch.setattr(sys, "stdin", Terminal("first\nsecond\n"))
    assert main(["chat"]) == 0
    assert "error: unknown model 'x'" in capsys.readouterr().err
    assert sent == [["first"], ["second"]]


def test_endpoint_status_of_a_site_that_is_not_running_exits_3(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 3 (not 0) lets a script tell a stopped site from a running one; the servers it
    left recorded are named."""
    from fabric.endpoint.state import Deployment, StateDB

    state = tmp_path / "state"
    assert main(["endpoint", "status", "--state-dir", str(state)]) == 3
    assert capsys.readouterr().out == \
        "site local is not running (start it with `fabric endpoint start`)\n"
    StateDB(state).insert(Deployment(id="d-left", model="m", version="1", state="ready"))
    assert main(["endpoint", "status", "--state-dir", str(state), "--json"]) == 3
    assert json.loads(capsys.readouterr().out) == {"running": False, "servers_left": ["d-left"]}
