"""The science modes through the ``fabric`` command line: ``logprobs``, ``hidden-states`` and
``--hook`` on every request command.

Most tests run ``main()`` in-process with the SDK's site calls replaced by fakes that record
their arguments and return results shaped like the real ones (torch tensors where the SDK
decodes tensors), so no site is started. The one ``slow`` test at the end runs the commands
against a real local site on the tiny model and compares them with the SDK's own results.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fabric.cli.main import main
from fabric.client.checks import build_request
from fabric.client.fabric import Fabric, _hooks
from fabric.client.streaming import Stream
from fabric.protocol import GenerationResult, Hook

IDENTITY = {"name": "tiny-llama", "version": "test", "sha256": "ab" * 32}
LOGPROBS = {
    "request_id": "r1", "model": IDENTITY,
    "usage": {"prompt_tokens": 5, "completion_tokens": 0},
    "timings": {"queue_s": 0.0, "prefill_s": 0.01, "decode_s": 0.0, "total_s": 0.01},
    "token_ids": [12, 3456, 7], "logprobs": [-0.5, -2.25, -1.0], "total": -3.75,
    "tokens": [" Paris", ".", "\n"],
}
GEN = torch.Generator().manual_seed(0)
LAYERS = {"0": torch.randn(3, 4, generator=GEN), "-1": 10 * torch.randn(3, 4, generator=GEN)}
HIDDEN = {
    "request_id": "r2", "model": IDENTITY,
    "usage": {"prompt_tokens": 3, "completion_tokens": 0},
    "timings": {"queue_s": 0.0, "prefill_s": 0.01, "decode_s": 0.0, "total_s": 0.01},
    "layers": LAYERS, "token_ids": [1, 450, 29871], "positions": [0, 1, 2],
}
CAPTURED = torch.arange(6, dtype=torch.float32).reshape(2, 3)


def generation(**extra: Any) -> GenerationResult:
    return GenerationResult.model_validate({
        "request_id": "r3", "model": IDENTITY, "text": " cell.", "token_ids": [9, 10],
        "finish_reason": "length", "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        "timings": {}, **extra})


class OneChunk:
    """A stream source: one text chunk, then the done event with a captured layer."""

    request_id = "r4"

    def events(self) -> Iterator[dict[str, Any]]:
        yield {"op": "event", "token_ids": [9], "text": " cell."}
        yield {"op": "done", "result": generation(captures={"11": CAPTURED})}

    def cancel(self) -> str:
        return "running"

    def close(self) -> None:
        pass

    def abandon(self) -> None:
        pass


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the SDK's request methods; each records its name and arguments."""
    log: list[dict[str, Any]] = []

    def logprobs(self: Fabric, text: str, continuation: str | None = None,
                 **kw: Any) -> dict[str, Any]:
        log.append({"method": "logprobs", "text": text, "continuation": continuation, **kw})
        return dict(LOGPROBS)

    def hidden_states(self: Fabric, text: str, **kw: Any) -> dict[str, Any]:
        log.append({"method": "hidden_states", "text": text, **kw})
        return {**HIDDEN, "layers": dict(LAYERS)}

    def generate(self: Fabric, prompt: str, **kw: Any) -> GenerationResult:
        log.append({"method": "generate", "prompt": prompt, **kw})
        return generation(captures={"11": CAPTURED})

    def stream(self: Fabric, prompt: str | None = None, **kw: Any) -> Stream:
        log.append({"method": "stream", "prompt": prompt, **kw})
        return Stream(OneChunk())

    def embed(self: Fabric, texts: list[str], **kw: Any) -> Any:
        log.append({"method": "embed", "texts": texts, **kw})
        return np.ones((len(texts), 4), dtype=np.float32)

    for name, fn in (("logprobs", logprobs), ("hidden_states", hidden_states),
                     ("generate", generate), ("stream", stream), ("embed", embed)):
        monkeypatch.setattr(Fabric, name, fn)
    return log


# -- help ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["logprobs", "hidden-states"])
def test_new_commands_have_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: fabric {command}")
    assert "--site" in out and "--hook" in out and "examples:" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert f"\n    {command}" in top and f"fabric {command} " in top


# -- logprobs -----------------------------------------------------------------------------------

def test_logprobs_prints_tokens_total_and_perplexity(
        calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["logprobs", "The capital of France is", "--continuation", " Paris.",
               "-m", "tiny-llama", "--version", "test", "--site", "somewhere"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert calls == [{"method": "logprobs", "text": "The capital of France is",
                      "continuation": " Paris.", "model": "tiny-llama", "version": "test",
                      "hooks": None}]
    assert out[0].split() == ["POS", "TOKEN_ID", "TOKEN", "LOGPROB"]
    for line, i, t, piece, v in zip(out[1:4], range(3), LOGPROBS["token_ids"],
                                    LOGPROBS["tokens"], LOGPROBS["logprobs"], strict=True):
        assert line.split()[:2] == [str(i), str(t)] and line.split()[-1] == f"{v:.4f}"
        assert repr(piece) in line  # quoted, so spaces and newlines show
    # Right-aligned: every row's last character sits in the same column.
    assert len({len(line) for line in out[:4]}) == 1
    # ... and so does every token id's last digit (12, 3456 and 7 are of three widths).
    ends = {line.index(f" {t} ") + len(str(t)) for line, t in zip(out[1:4], LOGPROBS["token_ids"],
                                                                  strict=True)}
    assert len(ends) == 1
    values = LOGPROBS["logprobs"]
    perplexity = math.exp(-sum(values) / len(values))
    assert out[4] == f"total {LOGPROBS['total']:.4f} over 3 tokens; perplexity {perplexity:.4f}"
    assert out[4] == "total -3.7500 over 3 tokens; perplexity 3.4903"  # exp(1.25)
    assert len(out) == 5


def test_logprobs_without_continuation_and_as_json(
        calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["logprobs", "The mitochondria is the powerhouse", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == LOGPROBS
    assert calls[0]["continuation"] is None and calls[0]["model"] == "smollm2-135m"
    assert calls[0]["version"] is None


def test_logprobs_with_nothing_scored(calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(Fabric, "logprobs", lambda self, *a, **kw: {
        **LOGPROBS, "token_ids": [], "tokens": [], "logprobs": [], "total": 0.0})
    assert main(["logprobs", "Hi"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        "total 0.0000 over 0 tokens; perplexity n/a"


# -- hidden states ------------------------------------------------------------------------------

def test_hidden_states_summary(calls: list[dict[str, Any]],
                               capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["hidden-states", "The mitochondria is", "--layers", "0,-1", "--positions=0,-1",
               "-m", "tiny-llama"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert calls == [{"method": "hidden_states", "text": "The mitochondria is",
                      "model": "tiny-llama", "version": None, "layers": [0, -1],
                      "positions": [0, -1], "hooks": None}]
    assert out[0] == "3 tokens; positions 0,1,2"
    assert out[1].split() == ["LAYER", "SHAPE", "MEAN", "STD", "LAST_NORM"]
    for line, (layer, tensor) in zip(out[2:], LAYERS.items(), strict=True):
        array = tensor.numpy().astype(np.float64)
        assert line.split() == [layer, "3x4", f"{array.mean():.4f}", f"{array.std():.4f}",
                                f"{math.sqrt(float((array[-1] ** 2).sum())):.4f}"]
    assert len(out) == 4


def test_hidden_states_default_layer_and_positions(calls: list[dict[str, Any]]) -> None:
    assert main(["hidden-states", "hi"]) == 0
    assert calls[0]["layers"] == [-1] and calls[0]["positions"] is None


def test_hidden_states_npz_round_trip(calls: list[dict[str, Any]], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "states.data"  # any name: the file is written exactly where asked
    assert main(["hidden-states", "The mitochondria is", "--layers", "0,-1", "--out",
                 str(path)]) == 0
    assert capsys.readouterr().out == f"{path}\n"
    with np.load(path) as saved:
        assert sorted(saved.files) == ["layer_-1", "layer_0", "positions", "token_ids"]
        for layer, tensor in LAYERS.items():
            assert saved[f"layer_{layer}"].dtype == np.float32
            np.testing.assert_array_equal(saved[f"layer_{layer}"], tensor.numpy())
        assert saved["token_ids"].tolist() == HIDDEN["token_ids"]
        assert saved["positions"].tolist() == HIDDEN["positions"]


def test_hidden_states_json(calls: list[dict[str, Any]],
                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hidden-states", "hi", "--layers=-1,0", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert calls[0]["layers"] == [-1, 0]
    assert got["layers"] == {k: v.tolist() for k, v in LAYERS.items()}
    assert got["token_ids"] == HIDDEN["token_ids"] and got["model"] == IDENTITY


def test_hidden_states_out_folder_missing(calls: list[dict[str, Any]], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-folder" / "h.npz"
    assert main(["hidden-states", "hi", "--out", str(missing)]) == 2
    assert capsys.readouterr().err == \
        f"error: --out: folder {str(missing.parent)!r} does not exist\n"
    assert calls == []  # refused before any request


@pytest.mark.parametrize(("args", "message"), [
    (["hidden-states", "hi", "--layers", "0,last"], "argument --layers: expected comma-separated"),
    (["hidden-states", "hi", "--out", "a.npz", "--json"], "not allowed with argument --out"),
])
def test_hidden_states_argument_errors(calls: list[dict[str, Any]], args: list[str],
                                       message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert calls == []


# -- --hook ---------------------------------------------------------------------------------------

@pytest.fixture
def vector_file(tmp_path: Path) -> Path:
    path = tmp_path / "v.npy"
    np.save(path, np.linspace(-1.0, 1.0, 6, dtype=np.float32))
    return path


def _hook_cases(vector_file: Path) -> list[tuple[str, Hook]]:
    saved = np.load(vector_file)
    return [
        ('{"kind": "capture", "layer": 10}', Hook(kind="capture", layer=10)),
        ('{"kind": "steer", "layer": -1, "vector": [0.5, -1], "scale": 2}',
         Hook(kind="steer", layer=-1, vector=[0.5, -1.0], scale=2.0)),
        (json.dumps({"kind": "steer", "layer": 10, "vector_file": str(vector_file),
                     "scale": 4.0}),
         Hook(kind="steer", layer=10, vector=[float(x) for x in saved], scale=4.0)),
        ('{"kind": "ablate_heads", "layer": 3, "heads": [0, 2]}',
         Hook(kind="ablate_heads", layer=3, heads=[0, 2])),
        ('{"kind": "ablate_neurons", "layer": 0, "neurons": [5, 1535]}',
         Hook(kind="ablate_neurons", layer=0, neurons=[5, 1535])),
    ]


def test_each_hook_kind_reaches_the_sdk(calls: list[dict[str, Any]], vector_file: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    cases = _hook_cases(vector_file)
    for text, want in cases:
        assert main(["generate", "The cell", "--json", "--hook", text]) == 0
        assert calls[-1]["method"] == "generate" and calls[-1]["hooks"] == [want]
    assert calls[2]["hooks"][0].vector == pytest.approx(np.linspace(-1, 1, 6).tolist())
    # All at once, in order; and what the CLI built is a request the SDK's checks accept.
    argv = [arg for text, _ in cases for arg in ("--hook", text)]
    assert main(["generate", "The cell", "--json", *argv]) == 0
    hooks = calls[-1]["hooks"]
    assert hooks == [want for _, want in cases]
    request = build_request("generate", model="tiny-llama", prompt="The cell", hooks=_hooks(hooks))
    assert request.hooks == hooks
    capsys.readouterr()


@pytest.mark.parametrize(("argv", "method"), [
    (["generate", "The cell"], "stream"),
    (["logprobs", "The cell", "-c", " divides."], "logprobs"),
    (["hidden-states", "The cell"], "hidden_states"),
    (["embed", "The cell", "-m", "tiny-llama"], "embed"),
])
def test_hooks_on_every_request_command(calls: list[dict[str, Any]], vector_file: Path,
                                        argv: list[str], method: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    steer = json.dumps({"kind": "steer", "layer": 1, "vector_file": str(vector_file)})
    assert main([*argv, "--hook", steer, "--hook", '{"kind": "capture", "layer": 2}']) == 0
    assert [c["method"] for c in calls] == [method]
    assert calls[0]["hooks"] == [
        Hook(kind="steer", layer=1, vector=np.load(vector_file).tolist()),
        Hook(kind="capture", layer=2)]
    capsys.readouterr()


def test_generate_captures_in_json_and_stream(calls: list[dict[str, Any]],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    hook = '{"kind": "capture", "layer": 10}'
    assert main(["generate", "The cell", "--json", "--hook", hook]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["captures"] == {"11": CAPTURED.tolist()} and got["text"] == " cell."
    assert main(["generate", "The cell", "--hook", hook]) == 0
    out = capsys.readouterr()
    assert out.out == " cell.\n"
    assert out.err == "captured hidden state 11: 2x3 (--json prints the values)\n"


@pytest.mark.parametrize(("hook", "message"), [
    ('{"kind": "steer", layer: 1}',
     "--hook #1 is not valid JSON (Expecting property name enclosed in double quotes at column "
     "19)"),
    ("steer", "--hook #1 is not valid JSON (Expecting value at column 1): 'steer'"),
    ("[1, 2]", "--hook #1 must be a JSON object like"),
    ('{"kind": "stear", "layer": 1}',
     "--hook #1 is not a valid hook: kind: Input should be 'capture', 'steer', 'ablate_heads' "
     "or 'ablate_neurons'"),
    ('{"kind": "capture"}', "--hook #1 is not a valid hook: layer: Field required"),
    ('{"kind": "capture", "layer": "ten"}',
     "--hook #1 is not a valid hook: layer: Input should be a valid integer"),
    ('{"kind": "capture", "layer": "10"}',
     "--hook #1 is not a valid hook: layer: Input should be a valid integer"),
    ('{"kind": "capture", "layer": true}',
     "--hook #1 is not a valid hook: layer: Input should be a valid integer"),
    ('{"kind": "steer", "layer": 1, "vector": ["1.5", 2]}',
     "--hook #1 is not a valid hook: vector.0: Input should be a valid number"),
    ('{"kind": "steer", "layer": 1, "vector": [1.0], "scale": "4"}',
     "--hook #1 is not a valid hook: scale: Input should be a valid number"),
    ('{"kind": "ablate_heads", "layer": 1, "heads": "0,1"}',
     "--hook #1 is not a valid hook: heads: Input should be a valid list"),
    ('{"kind": "steer", "layer": 1, "vector": [1, "x"]}',
     "--hook #1 is not a valid hook: vector.1: Input should be a valid number"),
    ('{"kind": "capture", "layer": 1, "layers": [2]}',
     "--hook #1 is not a valid hook: layers: Extra inputs are not permitted"),
    ('{"kind": "steer", "layer": 1, "vector_file": 7}',
     "--hook #1: vector_file must be a path to a .npy file, got 7"),
    ('{"kind": "steer", "layer": 1, "vector_file": "VECTOR", "vector": [1.0]}',
     "--hook #1 has both vector and vector_file: give one"),
])
def test_bad_hooks_exit_2_naming_the_problem(calls: list[dict[str, Any]], vector_file: Path,
                                             hook: str, message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    hook = hook.replace("VECTOR", str(vector_file))
    assert main(["generate", "The cell", "--hook", hook]) == 2
    out = capsys.readouterr()
    assert out.err.startswith(f"error: {message}"), out.err
    assert out.err.count("\n") == 1 and "Traceback" not in out.err and out.out == ""
    assert calls == []  # refused before any request


def _bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.npy"
    if kind == "text":
        path.write_text("0.1, 0.2, 0.3\n")
    elif kind == "matrix":
        np.save(path, np.zeros((2, 3)))
    elif kind == "strings":
        np.save(path, np.array(["a", "b"]))
    elif kind == "archive":
        with path.open("wb") as fh:
            np.savez(fh, v=np.zeros(3))
    return path


@pytest.mark.parametrize(("kind", "message"), [
    ("missing", "does not exist"),
    ("text", "is not a readable .npy file"),
    ("matrix", "must hold a 1-D array of numbers, got float64 with shape (2, 3)"),
    ("strings", "must hold a 1-D array of numbers, got <U1 with shape (2,)"),
    ("archive", "is an .npz archive"),
])
def test_bad_vector_files(calls: list[dict[str, Any]], tmp_path: Path, kind: str, message: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    path = _bad_file(tmp_path, kind)
    ok = '{"kind": "capture", "layer": 1}'
    bad = json.dumps({"kind": "steer", "layer": 1, "vector_file": str(path)})
    # The second hook is the bad one: the message says which.
    assert main(["logprobs", "The cell", "--hook", ok, "--hook", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --hook #2: vector_file {str(path)!r} {message}"), err
    assert "Traceback" not in err and calls == []


# -- end to end: a real local site on the tiny model ---------------------------------------------

@pytest.mark.slow
def test_cli_equals_sdk_on_a_real_site(local_site: Any, site_transport: Any, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``fabric logprobs`` and ``fabric hidden-states`` (with a steering vector from a .npy
    file) print what ``Fabric`` returns for the same inputs."""
    from tests.plugins.site import TINY_MODEL

    site = ["--model", TINY_MODEL, "--site", str(local_site.site_dir)]
    text, continuation = "The mitochondria is", " the powerhouse of the cell."
    with Fabric(transport=site_transport, on_status=None) as fab:
        want_lp = fab.logprobs(text, continuation, model=TINY_MODEL)
        plain = fab.hidden_states(text, model=TINY_MODEL, layers=[1, 2], positions=[0, -1])
        hidden = plain["layers"]["1"].shape[-1]
        vector = torch.Generator().manual_seed(3)
        steer = [float(x) for x in torch.randn(hidden, generator=vector)]
        hooks = [{"kind": "steer", "layer": 1, "vector": steer, "scale": 2.0}]
        want_hs = fab.hidden_states(text, model=TINY_MODEL, layers=[1, 2], positions=[0, -1],
                                    hooks=hooks)

    assert main(["logprobs", text, "--continuation", continuation, *site, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == want_lp["token_ids"] and got["model"] == want_lp["model"]
    np.testing.assert_allclose(got["logprobs"], want_lp["logprobs"], atol=1e-5, rtol=0)

    assert main(["logprobs", text, "--continuation", continuation, *site]) == 0
    last = capsys.readouterr().out.splitlines()[-1].split()
    values = np.asarray(want_lp["logprobs"], dtype=np.float64)
    assert last[0] == "total" and last[2:5] == ["over", str(len(values)), "tokens;"]
    assert float(last[1]) == pytest.approx(want_lp["total"], abs=1e-3)
    assert last[5] == "perplexity"
    assert float(last[6]) == pytest.approx(math.exp(-values.mean()), rel=1e-3)

    np.save(tmp_path / "v.npy", np.asarray(steer, dtype=np.float32))
    hook = json.dumps({"kind": "steer", "layer": 1, "vector_file": str(tmp_path / "v.npy"),
                       "scale": 2.0})
    out = tmp_path / "h.npz"
    assert main(["hidden-states", text, "--layers", "1,2", "--positions=0,-1", *site,
                 "--hook", hook, "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}\n"
    with np.load(out) as saved:
        assert saved["token_ids"].tolist() == want_hs["token_ids"]
        assert saved["positions"].tolist() == [0, -1]
        for layer in ("1", "2"):
            np.testing.assert_allclose(saved[f"layer_{layer}"], want_hs["layers"][layer].numpy(),
                                       atol=1e-5, rtol=0)
        # The hook did act through the CLI: hidden state 2 moved, hidden state 1 did not.
        np.testing.assert_allclose(saved["layer_1"], plain["layers"]["1"].numpy(), atol=1e-5)
        assert not np.allclose(saved["layer_2"], plain["layers"]["2"].numpy(), atol=1e-3)


def test_a_logprobs_result_whose_lists_disagree_is_an_error(
        calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A token without its log-probability must not be printed beside another's."""
    monkeypatch.setattr(Fabric, "logprobs", lambda self, *a, **kw: {
        **LOGPROBS, "logprobs": [-0.5, -2.25]})
    assert main(["logprobs", "Hi"]) == 1
    out = capsys.readouterr()
    assert out.err == "error: logprobs result has 3 token ids, 3 tokens and 2 log-probabilities\n"
    assert out.out == ""
