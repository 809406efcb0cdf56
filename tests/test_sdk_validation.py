"""Bad input to the SDK fails fast, client-side, with the exact typed error.

A ``Fabric`` whose transport refuses every call proves that the checks run before any round
trip to a site. Stream bookkeeping (chunks, result, close/cancel) is tested with an in-memory
event source.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import fabric
from fabric import (
    Cancelled,
    Fabric,
    FabricError,
    InvalidRequest,
    Overloaded,
    UnknownModel,
)
from fabric.client.decoding import decode_tensors, embeddings_from_results, parse_generation
from fabric.client.streaming import Stream


class RefusingTransport:
    """A transport that fails the test if anything reaches it."""

    site = "test"
    can_reach_servers = True

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future[Any]:
        self.calls.append(fn)
        raise AssertionError(f"invalid input reached the transport ({fn})")

    def close(self) -> None:
        pass


@pytest.fixture
def fab() -> Fabric:
    return Fabric(transport=RefusingTransport(), on_status=None)


def result_dict(text: str = "hi") -> dict[str, Any]:
    return {
        "request_id": "r1",
        "model": {"name": "m", "version": "1", "sha256": "ab" * 32},
        "text": text, "token_ids": [1, 2], "finish_reason": "length",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        "timings": {"queue_s": 0.0, "prefill_s": 0.1, "decode_s": 0.2, "total_s": 0.3},
    }


# -- prompts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt(fab: Fabric, prompt: str) -> None:
    with pytest.raises(InvalidRequest, match=r"^prompt is empty: give at least one"):
        fab.generate(prompt)
    with pytest.raises(InvalidRequest, match=r"^prompt is empty"):
        fab.stream(prompt)


@pytest.mark.parametrize(("prompt", "kind"), [
    (None, "NoneType"), (5, "int"), (b"bytes", "bytes"), (["a"], "list"), ({"a": 1}, "dict"),
])
def test_non_string_prompt(fab: Fabric, prompt: Any, kind: str) -> None:
    with pytest.raises(InvalidRequest, match=rf"^prompt must be a string, got {kind}$") as info:
        fab.generate(prompt)
    assert type(info.value) is InvalidRequest
    assert info.value.details["field"] == "prompt"


def test_other_text_inputs(fab: Fabric) -> None:
    with pytest.raises(InvalidRequest, match=r"^continuation is empty"):
        fab.logprobs("The sky is", "")
    with pytest.raises(InvalidRequest, match=r"^prompt must be a string, got int"):
        fab.hidden_states(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match=r"^layers\[1\] must be an integer"):
        fab.hidden_states("x", layers=[0, "last"])  # type: ignore[list-item]
    with pytest.raises(InvalidRequest, match=r"^text is empty"):
        fab.embed("")
    with pytest.raises(InvalidRequest, match=r"^texts\[1\] must be a string, got int"):
        fab.embed(["ok", 7])  # type: ignore[list-item]
    with pytest.raises(InvalidRequest, match=r"^texts must be a string or a non-empty list"):
        fab.embed([])
    with pytest.raises(InvalidRequest, match=r"pooling"):
        fab.embed("x", pooling="max")


# -- sampling ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_tokens": 0}, r"^max_tokens must be positive, got 0$"),
    ({"max_tokens": -3}, r"^max_tokens must be positive, got -3$"),
    ({"max_tokens": True}, r"^max_tokens must be an integer, got bool True$"),
    ({"max_tokens": 1.5}, r"^max_tokens must be an integer, got float 1.5$"),
    ({"max_tokens": "5"}, r"^max_tokens must be an integer, got str '5'$"),
    ({"temperature": -0.1}, r"^temperature must be in \[0.0, 100.0\], got -0.1$"),
    ({"temperature": "hot"}, r"^temperature must be a number, got str 'hot'$"),
    ({"top_p": 0}, r"^top_p must be in \(0.0, 1.0\], got 0$"),
    ({"top_p": 1.5}, r"^top_p must be in \(0.0, 1.0\], got 1.5$"),
    ({"top_k": -1}, r"^top_k must be >= 0, got -1$"),
    ({"seed": "x"}, r"^seed must be an integer"),
    ({"stop": [""]}, r"^stop must be a string or a list of non-empty strings$"),
    ({"stop": 5}, r"^stop must be a string or a list"),
    ({"logprobs": "yes"}, r"^logprobs must be True or False"),
    ({"timeout": 0}, r"timeout"),
    ({"model": ""}, r"^model must be a non-empty string, got ''$"),
    ({"model": None}, r"^model must be a non-empty string, got None$"),
    ({"version": ""}, r"^version must be a non-empty string"),
])
def test_bad_sampling(fab: Fabric, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        fab.generate("hello", **kwargs)
    with pytest.raises(InvalidRequest, match=message):
        fab.stream("hello", **kwargs)
    with pytest.raises(InvalidRequest, match=message):
        fab.chat([{"role": "user", "content": "hello"}], **kwargs)


# -- chat messages ----------------------------------------------------------------------------

@pytest.mark.parametrize(("messages", "message"), [
    ([], r"^messages is empty"),
    ("hello", r"^messages must be a list of .* got str$"),
    ({"role": "user", "content": "x"}, r"^messages must be a list of .* got dict$"),
    (None, r"^messages must be a list of .* got NoneType$"),
    ([1], r"^messages\[0\] must be a dict with 'role' and 'content', got int$"),
    ([{"role": "bob", "content": "x"}],
     r"^messages\[0\]\.role must be one of system, user, assistant, tool, got 'bob'$"),
    ([{"content": "x"}], r"^messages\[0\]\.role must be one of .* got None$"),
    ([{"role": "user"}], r"^messages\[0\]\.content must be a string, got NoneType$"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}],
     r"^messages\[1\]\.content must be a string, got int$"),
    ([{"role": "user", "content": "x", "name": "n"}], r"^messages\[0\] has unknown keys"),
    ([{"role": "system", "content": "be brief"}], r"^messages has no non-empty 'user' message"),
    ([{"role": "user", "content": "  "}], r"^messages has no non-empty 'user' message"),
])
def test_bad_messages(fab: Fabric, messages: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        fab.chat(messages)
    if messages is not None:  # stream(messages=None) means "no messages given"
        with pytest.raises(InvalidRequest, match=message):
            fab.stream(messages=messages)


def test_stream_needs_prompt_xor_messages(fab: Fabric) -> None:
    with pytest.raises(InvalidRequest, match="exactly one of prompt or messages"):
        fab.stream()
    with pytest.raises(InvalidRequest, match="exactly one of prompt or messages"):
        fab.stream("x", messages=[{"role": "user", "content": "x"}])


# -- functions and deployments ----------------------------------------------------------------

def test_submit_and_deploy_inputs(fab: Fabric) -> None:
    with pytest.raises(InvalidRequest, match=r"^fn must be callable, got str$"):
        fab.submit("print")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match=r"^model must be a non-empty string"):
        fab.submit(print, model="")
    with pytest.raises(InvalidRequest, match=r"^pp must be positive, got 0$"):
        fab.deploy("smollm2-135m", pp=0)
    with pytest.raises(InvalidRequest, match=r"^tp must be an integer"):
        fab.deploy("smollm2-135m", tp=1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match=r"^deployment id must be a non-empty string"):
        fab.undeploy("")
    with pytest.raises(InvalidRequest, match="site must be a non-empty string"):
        Fabric(site="")


def test_nothing_reached_the_transport(fab: Fabric) -> None:
    for call in (lambda: fab.generate(""), lambda: fab.chat([]), lambda: fab.embed([])):
        with pytest.raises(InvalidRequest):
            call()
    transport = fab.transport
    assert isinstance(transport, RefusingTransport) and transport.calls == []


def test_constructing_fabric_opens_nothing() -> None:
    fab = Fabric(site="no-such-site")
    with pytest.raises(InvalidRequest):
        fab.generate("")
    assert fab._transport is None  # lazy: no endpoint started, no Globus login


def test_package_exports() -> None:
    assert fabric.Fabric is Fabric
    assert issubclass(fabric.UnknownModel, fabric.InvalidRequest)
    for name in fabric.__all__:
        assert getattr(fabric, name) is not None
    with pytest.raises(AttributeError):
        _ = fabric.NoSuchThing


def test_client_does_not_import_engine_or_globus() -> None:
    import subprocess
    import sys

    code = ("import sys, fabric; fabric.Fabric; import fabric.cli.main, fabric.cli.generate; "
            "bad = [m for m in sys.modules if m.startswith(('fabric.engine', 'globus', 'torch',"
            " 'parsl', 'deepspeed'))]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# -- typed errors from the site pass through unchanged -----------------------------------------

class ErrorTransport(RefusingTransport):
    """Every call fails the way the endpoint would fail it."""

    def __init__(self, error: FabricError) -> None:
        super().__init__()
        self.error = error

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future[Any]:
        self.calls.append(fn)
        future: Future[Any] = Future()
        future.set_exception(self.error)
        return future


def test_unknown_model_error_passes_through() -> None:
    pytest.importorskip("fabric.endpoint.functions")
    error = UnknownModel("unknown model 'gpt-9'; available: minilm-l6, smollm2-135m",
                         model="gpt-9", available=["minilm-l6", "smollm2-135m"])
    fab = Fabric(transport=ErrorTransport(error), on_status=None)
    with pytest.raises(UnknownModel, match="available: minilm-l6, smollm2-135m") as info:
        fab.generate("hi", model="gpt-9")
    assert info.value.details["available"] == ["minilm-l6", "smollm2-135m"]


# -- results ----------------------------------------------------------------------------------

def test_parse_generation_and_tensors() -> None:
    torch = pytest.importorskip("torch")
    result = parse_generation(result_dict())
    assert result.text == "hi" and result.model.sha256 == "ab" * 32
    with pytest.raises(FabricError):
        parse_generation("nope")  # type: ignore[arg-type]
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    wire = {"layers": {"-1": {"dtype": "float32", "shape": [2, 3], "data": t.numpy().tobytes()}},
            "tokens": [1, 2]}
    decoded = decode_tensors(wire)
    assert torch.equal(decoded["layers"]["-1"], t) and decoded["tokens"] == [1, 2]
    bf = t.to(torch.bfloat16)
    wire_bf = {"dtype": "bfloat16", "shape": [2, 3], "data": bf.view(torch.int16).numpy().tobytes()}
    assert torch.equal(decode_tensors(wire_bf), bf)
    vectors = embeddings_from_results([{"embeddings": [[1.0, 0.0]]}, {"embeddings": [[0.0, 1.0]]}])
    assert vectors.shape == (2, 2) and vectors.dtype.name == "float32"


# -- Stream bookkeeping -----------------------------------------------------------------------

class ListSource:
    """Events from a list; optionally blocks after ``block_after`` events until cancelled.
    ``answer_after``: ``cancel`` answers only once that is set (the server's "cancelled" has
    reached the reader before the cancel's own answer came back)."""

    request_id = "r1"

    def __init__(self, events: list[dict[str, Any]], block_after: int | None = None,
                 answer_after: threading.Event | None = None) -> None:
        self._events = events
        self._block_after = block_after
        self._answer_after = answer_after
        self.cancelled = threading.Event()
        self.closed = self.abandoned = 0

    def events(self) -> Iterator[dict[str, Any]]:
        for i, event in enumerate(self._events):
            if self._block_after is not None and i == self._block_after:
                assert self.cancelled.wait(5)
                raise Cancelled("request r1 was cancelled")
            yield event

    def cancel(self) -> str:
        self.cancelled.set()
        if self._answer_after is not None:
            assert self._answer_after.wait(5)
        return "running"

    def close(self) -> None:
        self.closed += 1

    def abandon(self) -> None:
        self.abandoned += 1


def _events(n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"op": "event", "index": i, "token_ids": [i], "text": f"t{i} ", "logprobs": None}
        for i in range(n)
    ]
    out.append({"op": "done", "result": result_dict("".join(f"t{i} " for i in range(n)))})
    return out


def test_stream_concatenates_to_result() -> None:
    source = ListSource(_events(4))
    stream = Stream(source)
    chunks = list(stream)
    assert chunks == ["t0 ", "t1 ", "t2 ", "t3 "]
    assert stream.result is not None and "".join(chunks) == stream.result.text == stream.text
    assert stream.token_ids == [0, 1, 2, 3] and stream.finished and source.closed == 1
    stream.close()  # after the end: no cancel, no second close
    assert not source.cancelled.is_set() and source.closed == 1


def test_stream_close_midway_cancels() -> None:
    source = ListSource(_events(10))
    with Stream(source) as stream:
        assert next(stream) == "t0 "
    assert source.cancelled.is_set() and stream.cancelled and stream.result is None
    assert source.closed == 1
    with pytest.raises(StopIteration):
        next(stream)


@pytest.mark.parametrize("server_first", [False, True])
def test_stream_cancel_from_another_thread(server_first: bool) -> None:
    """The reader ends quietly, whichever comes first: the cancel's answer, or the server's
    "cancelled" pushed to the stream (CI saw the reader raise ``Cancelled`` then)."""
    read_done = threading.Event()
    source = ListSource(_events(10), block_after=2,
                        answer_after=read_done if server_first else None)
    stream = Stream(source)
    got: list[str] = []
    raised: list[BaseException] = []

    def read() -> None:
        try:
            got.extend(stream)
        except BaseException as exc:
            raised.append(exc)
        finally:
            read_done.set()

    reader = threading.Thread(target=read)
    reader.start()
    while len(got) < 2 and reader.is_alive():
        reader.join(0.01)
    assert stream.cancel() == "running"
    reader.join(5)
    assert not reader.is_alive() and got == ["t0 ", "t1 "] and stream.cancelled
    assert raised == []


def test_stream_error_is_typed() -> None:
    class Failing(ListSource):
        def events(self) -> Iterator[dict[str, Any]]:
            yield {"op": "event", "token_ids": [1], "text": "a"}
            raise Overloaded("queue full", retry_after=1.5)

    stream = Stream(Failing([]))
    assert next(stream) == "a"
    with pytest.raises(Overloaded) as info:
        next(stream)
    assert info.value.details["retry_after"] == 1.5 and stream.finished


def test_only_a_stream_dropped_unfinished_is_abandoned() -> None:
    """Dropped after one chunk: the source is told once (it cancels at the server). Read to
    its end, or closed, it is not: there is nothing left to stop."""
    sources = [ListSource(_events(3)) for _ in range(3)]
    dropped, whole, closed = (Stream(s) for s in sources)
    next(dropped)
    list(whole)
    next(closed)
    closed.close()
    del dropped, whole, closed
    assert [s.abandoned for s in sources] == [1, 0, 0]
    assert sources[2].cancelled.is_set() and not sources[0].cancelled.is_set()


def test_stream_without_result_is_an_error() -> None:
    stream = Stream(ListSource(_events(2)[:-1]))
    with pytest.raises(FabricError, match="ended without a result"):
        stream.wait()


# -- status while waiting on a cold model server ------------------------------------------------

class SlowSiteTransport(RefusingTransport):
    """The request finishes after ``delay_s``; the site reports the deployment as loading
    (``ready``: as ready, a slow call to a warm server)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.controls = 0
        self.ready = False
        self.status_times_out = False

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future[Any]:
        self.calls.append(fn)
        future: Future[Any] = Future()
        threading.Timer(self.delay_s, future.set_result, [result_dict()]).start()
        return future

    def control(self, op: str, timeout_s: float = 30.0, **fields: Any) -> dict[str, Any]:
        self.controls += 1
        if self.status_times_out:  # a busy site (LocalTransport.control's future)
            raise TimeoutError
        state = "ready" if self.ready else "queued" if self.controls == 1 else "loading"
        return {"deployments": [
            {"id": "d-old", "model": "smollm2-135m", "version": "v", "state": "dead"},
            {"id": "d-1", "model": "smollm2-135m", "version": "v", "state": state,
             "job_id": "9", "queue_position": 1},
        ][::-1]}


def test_cold_start_reports_status_then_returns() -> None:
    pytest.importorskip("fabric.endpoint.functions")
    seen: list[dict[str, Any]] = []
    transport = SlowSiteTransport(delay_s=0.6)
    # The fake site answers every call with a result, as run_request does: the path where a
    # worker serves the request whole (the handed-off path is tests/test_handoff.py).
    fab = Fabric(transport=transport, on_status=seen.append, status_interval_s=0.1,
                 handoff=False)
    assert fab.generate("hello").text == "hi"
    assert seen and seen[0]["state"] == "queued" and seen[0]["id"] == "d-1"
    assert {s["state"] for s in seen} <= {"queued", "loading"}
    # A warm call (answered at once) asks nothing.
    transport.delay_s, transport.controls, seen[:] = 0.0, 0, []
    fab.generate("hello")
    assert transport.controls == 0 and seen == []
    # A slow call to a server found ready has nothing to explain (the CLI printed
    # "waiting for m: ready" before a slow call's answer or error).
    transport.delay_s, transport.ready = 0.6, True
    fab.generate("hello")
    assert transport.controls >= 1 and seen == []
    # A status query that times out leaves the call alone (CI: a busy site's status took over
    # 5 s and the user's generate raised TimeoutError).
    transport.controls, transport.ready, transport.status_times_out = 0, False, True
    assert fab.generate("hello").text == "hi"
    assert transport.controls >= 1 and seen == []



def test_status_printer_prints_each_change_once() -> None:
    import io

    from fabric.client.fabric import StatusPrinter

    buf = io.StringIO()
    printer = StatusPrinter(buf)
    for state in ("absent", "queued", "queued", "loading", "ready"):
        printer({"model": "m", "state": state, "queue_position": 3})
    assert buf.getvalue().splitlines() == [
        "fabric: m: launching a model server",
        "fabric: m: queued in the batch scheduler, position 3",
        "fabric: m: loading the model",
        "fabric: m: ready",
    ]


def test_site_picks_its_transport(tmp_path: Any) -> None:
    """A site definition with a Globus Compute endpoint id goes through Globus; one without
    (the local site, a Slurm cluster on this machine) runs embedded. Opening either contacts
    nothing."""
    import yaml

    from fabric.client.local import LocalTransport

    pytest.importorskip("fabric.globus.transport")
    from fabric.globus.transport import GlobusTransport

    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "fabric.yaml").write_text(yaml.safe_dump({
        "name": "remote", "endpoint_id": "0b7a2a4e-7b5e-4c1e-9f0e-8d6f3b1a2c3d",
        "state_dir": str(tmp_path / "state")}))
    fab = Fabric(site=str(remote))
    assert isinstance(fab.transport, GlobusTransport) and not fab.transport.can_reach_servers
    fab.close()
    local = Fabric(site="local")
    assert isinstance(local.transport, LocalTransport) and local.transport.can_reach_servers
    local.close()


# -- sites and transports ------------------------------------------------------------------

def test_remote_site_without_endpoint_id_is_refused_not_run_locally() -> None:
    from fabric import EndpointError, Fabric

    with pytest.raises(EndpointError, match="endpoint_id is not set"):
        _ = Fabric(site="polaris").transport


def test_open_transport_refuses_or_chooses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    """One factory for the SDK, the campaign runner and the CLI: a remote site without its
    endpoint id is refused (not run embedded), an embedded site runs locally, a site with an
    endpoint id goes through Globus Compute (nothing is started or contacted either way)."""
    from fabric.client.local import LocalTransport
    from fabric.client.transport import open_transport
    from fabric.errors import EndpointError
    from fabric.globus.transport import GlobusTransport
    from tests.plugins.site import write_site

    monkeypatch.setenv("FABRIC_HOME", str(tmp_path / "home"))
    with pytest.raises(EndpointError, match="endpoint_id is not set") as err:
        open_transport("polaris")
    assert err.value.details == {"site": "polaris"}
    local = write_site(tmp_path / "here", name="here")
    embedded = open_transport(str(local), state_dir=tmp_path / "elsewhere")
    assert isinstance(embedded, LocalTransport) and embedded.site == "here"
    assert embedded.state_dir == (tmp_path / "elsewhere").resolve() and embedded.info is None
    embedded.close()
    remote = write_site(tmp_path / "far", name="far",
                        endpoint_id="0b6e5c4a-0f5c-4e5b-9f0d-0000000000bb")
    through_globus = open_transport(str(remote))
    assert isinstance(through_globus, GlobusTransport) and through_globus.site == "far"
    assert through_globus._executor is None  # built (and the cloud contacted) on first submit


def test_an_embedded_site_never_loads_globus(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.plugins.site import write_site

    folder = write_site(tmp_path / "here", name="here")
    code = ("import sys\nfrom fabric import Fabric\n"
            f"t = Fabric(site={str(folder)!r}, on_status=None).transport\n"
            "assert type(t).__name__ == 'LocalTransport'\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('fabric.globus', 'globus_')))\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr


def test_hook_layers_heads_and_neurons_are_integers_not_look_alikes() -> None:
    """``"layer": "1"`` was read as 1 by the SDK (the CLI refused it); numpy's integers are
    integers (a list of heads built with numpy is common)."""
    import numpy as np

    from fabric.errors import InvalidHook
    from fabric.protocol import validate_request

    def hook(**fields: object) -> dict[str, object]:
        return {"model": "m", "prompt": "x", "hooks": [{"kind": "ablate_heads", **fields}]}

    for bad in ("1", True, 1.0):
        with pytest.raises(InvalidHook, match="valid integer"):
            validate_request(hook(layer=bad, heads=[0]))
    with pytest.raises(InvalidHook, match="valid integer"):
        validate_request(hook(layer=0, heads=["2"]))
    ok = validate_request(hook(layer=np.int64(2), heads=[np.int32(1), 3]))
    assert ok.hooks[0].layer == 2 and ok.hooks[0].heads == [1, 3]
    assert all(type(h) is int for h in ok.hooks[0].heads)


def test_top_logprobs_alone_asks_for_logprobs(fab: Fabric,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    built = fab.stream_request("The sky is", top_logprobs=2)
    assert built.sampling.logprobs is True and built.sampling.top_logprobs == 2
    assert fab.stream_request("The sky is").sampling.logprobs is False
    sent: list[Any] = []

    class Sent(Exception):
        pass

    def run(request: Any) -> Any:
        sent.append(request)
        raise Sent

    monkeypatch.setattr(fab, "_run", run)
    with pytest.raises(Sent):
        fab.generate("The sky is", top_logprobs=2)
    assert sent[0].sampling.logprobs is True and sent[0].sampling.top_logprobs == 2


@pytest.mark.parametrize("layers", [True, False])
def test_a_bool_is_not_a_layer(fab: Fabric, layers: bool) -> None:
    with pytest.raises(InvalidRequest, match=r"^layers must be a non-empty list of integers"):
        fab.hidden_states("x", layers=layers)  # type: ignore[arg-type]
    transport = fab.transport
    assert isinstance(transport, RefusingTransport) and transport.calls == []
