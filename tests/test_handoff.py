"""The non-blocking request path on the session's real local site (2 request workers).

A request worker only admits a request and hands it off (``Fabric.request_future``): the
client reaches the model server itself (direct), or the client's one long-poll brings results
and streams (``fabric.client.poller``, forced here by a transport that says it cannot reach
the servers). So more requests than the site has workers are at the server's batch at once,
and a handful of concurrent streams and requests cost a handful of poll tasks, not one per
poll per stream.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from fabric import Fabric
from fabric.errors import ContextLengthExceeded, FabricError
from fabric.serverclient import ServerClient
from fabric.wire import functions
from tests.plugins.site import TINY_MODEL

pytestmark = pytest.mark.slow

N = 6
"""Concurrent requests: three times the site's request workers."""


class CountingTransport:
    """The site's own transport, counting the tasks per function; ``reach`` False makes the
    client take the long-poll path it takes behind Globus Compute."""

    def __init__(self, inner: Any, reach: bool, admission_slots: int = 2) -> None:
        self.inner = inner
        self.site = inner.site
        self.can_reach_servers = reach
        self.admission_slots = admission_slots
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        with self._lock:
            name = getattr(fn, "__name__", str(fn))
            self.counts[name] = self.counts.get(name, 0) + 1
        return self.inner.submit(fn, *args, **kwargs)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def direct(site_transport: Any) -> Iterator[tuple[Fabric, CountingTransport]]:
    t = CountingTransport(site_transport, reach=True)
    with Fabric(transport=t, on_status=None) as fab:
        yield fab, t


@pytest.fixture
def polled(site_transport: Any) -> Iterator[tuple[Fabric, CountingTransport]]:
    t = CountingTransport(site_transport, reach=False)
    with Fabric(transport=t, on_status=None) as fab:
        yield fab, t


def _server(fab: Fabric) -> ServerClient:
    fab.generate("warm", model=TINY_MODEL, max_tokens=1)
    (dep,) = [d for d in fab.deployments() if d["model"] == TINY_MODEL and d["state"] == "ready"]
    return ServerClient(dep["address"], dep["public_key"], timeout_s=10.0)


def _watch_running(server: ServerClient, stop: threading.Event, seen: list[int]) -> None:
    while not stop.is_set():
        seen.append(int(server.health()["running"]))
        time.sleep(0.01)


def _prompts() -> list[str]:
    return [f"Request {i}: the mitochondria is" for i in range(N)]


def test_more_requests_than_workers_are_at_the_server_at_once(
        direct: tuple[Fabric, CountingTransport]) -> None:
    fab, transport = direct
    server = _server(fab)
    seen: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_running, args=(server, stop, seen))
    watcher.start()
    try:
        with ThreadPoolExecutor(N) as pool:
            results = list(pool.map(
                lambda p: fab.generate(p, model=TINY_MODEL, max_tokens=400), _prompts()))
    finally:
        stop.set()
        watcher.join()
        server.close()
    # With a worker pinned per request, at most 2 (the site's workers) would be running.
    assert max(seen) == N, f"most requests running at once: {max(seen)} (of {N})"
    assert transport.counts.get("run_request", 0) == 0
    # The handed-off path returns what a worker serving the request whole returns.
    whole = Fabric(transport=transport, on_status=None, handoff=False)
    again = whole.generate(_prompts()[0], model=TINY_MODEL, max_tokens=400)
    assert again.token_ids == results[0].token_ids and again.text == results[0].text
    assert transport.counts["run_request"] == 1


def test_typed_errors_survive_the_handoff(direct: tuple[Fabric, CountingTransport],
                                          polled: tuple[Fabric, CountingTransport]) -> None:
    for fab, _ in (direct, polled):
        with pytest.raises(ContextLengthExceeded):
            fab.generate("tides " * 400, model=TINY_MODEL, max_tokens=300)


def test_streams_and_requests_share_one_long_poll(
        direct: tuple[Fabric, CountingTransport],
        polled: tuple[Fabric, CountingTransport]) -> None:
    fab_direct, _ = direct
    fab, transport = polled
    prompts = _prompts()
    expected = [fab_direct.generate(p, model=TINY_MODEL, max_tokens=48) for p in prompts]

    def stream(p: str) -> tuple[str, list[int]]:
        with fab.stream(p, model=TINY_MODEL, max_tokens=48) as s:
            text = "".join(s)
        return text, s.token_ids

    with ThreadPoolExecutor(N) as pool:
        streams = [pool.submit(stream, p) for p in prompts[:3]]
        plain = [pool.submit(fab.generate, p, model=TINY_MODEL, max_tokens=48)
                 for p in prompts[3:]]
        got_streams = [f.result(timeout=120) for f in streams]
        got_plain = [f.result(timeout=120) for f in plain]
    for (text, ids), want in zip(got_streams, expected[:3], strict=True):
        assert ids == want.token_ids and text == want.text
    for res, want in zip(got_plain, expected[3:], strict=True):
        assert res.token_ids == want.token_ids
    polls = transport.counts.get("poll_requests", 0)
    assert fab._path.poller().tasks_submitted == polls
    # 3 streams of 48 tokens polled one by one would be >= 3 tasks per decode step they
    # span; one poll for all stays within a few per request.
    assert 1 <= polls <= 4 * N, transport.counts


def test_a_cancelled_polled_stream_stops_at_the_server(
        polled: tuple[Fabric, CountingTransport], long_prompt: str) -> None:
    fab, _ = polled
    with fab.stream(long_prompt, model=TINY_MODEL, max_tokens=400) as s:
        first = next(iter(s))
        was = s.cancel()
        rest = list(s)
    assert first and was in ("running", "done")
    assert (s.cancelled and s.result is None) or was == "done"
    assert len(rest) < 400


def test_a_lone_short_request_is_answered_by_its_admission(
        polled: tuple[Fabric, CountingTransport],
        direct: tuple[Fabric, CountingTransport]) -> None:
    """With nothing else open the site holds the admission up to a second for the result:
    one task, no poll; the result is the one the direct path gets."""
    fab, transport = polled
    want = direct[0].generate("The mitochondria is", model=TINY_MODEL, max_tokens=8)
    got = fab.generate("The mitochondria is", model=TINY_MODEL, max_tokens=8)
    assert got.token_ids == want.token_ids
    assert transport.counts == {"open_stream": 1}, transport.counts


def test_a_polled_streams_admission_brings_its_first_tokens(
        polled: tuple[Fabric, CountingTransport],
        direct: tuple[Fabric, CountingTransport]) -> None:
    """A polled stream's admission is held until its first events and carries them back
    (one task round trip to the first token behind Globus Compute, not two); the stream then
    goes on from that cursor with nothing repeated or lost."""
    from fabric.client.checks import build_request, sampling

    fab, transport = polled
    want = direct[0].generate("Tell me about tides", model=TINY_MODEL, max_tokens=64)
    request = build_request("generate", model=TINY_MODEL, version=None,
                            prompt="Tell me about tides",
                            sampling=sampling(64, 0.0, 1.0, 0, None, (), False),
                            timeout=None, hooks=None)
    info = transport.submit(functions.open_stream, request.model_dump(mode="json"), None,
                            "poll", 5.0, True).result(timeout=60)
    inline = [int(t) for e in info["events"] for t in e.get("token_ids") or []]
    assert inline and inline == want.token_ids[:len(inline)]
    assert info["cursor"] >= 1
    with fab.stream("Tell me about tides", model=TINY_MODEL, max_tokens=64) as s:
        text = "".join(s)
    assert s.token_ids == want.token_ids and text == want.text


def test_a_burst_of_admissions_goes_in_few_tasks(local_site: Any,
                                                direct: tuple[Fabric, CountingTransport]) -> None:
    """Streams opened at once while the client's one admission slot is taken queue, and what
    queued goes in one ``open_streams`` task: fewer tasks than streams, each stream exactly
    what it is alone."""
    prompts = _prompts()
    want = [direct[0].generate(p, model=TINY_MODEL, max_tokens=24) for p in prompts]
    for reach in (False, True):  # the long-poll path (as behind Globus), then direct
        transport = CountingTransport(local_site.transport(), reach=reach, admission_slots=1)
        with Fabric(transport=transport, on_status=None) as fab:
            def stream(p: str, fab: Fabric = fab) -> tuple[str, list[int]]:
                with fab.stream(p, model=TINY_MODEL, max_tokens=24) as s:
                    return "".join(s), s.token_ids

            with ThreadPoolExecutor(N) as pool:
                got = list(pool.map(stream, prompts))
            admissions = fab._path.admissions().tasks
        for (text, ids), res in zip(got, want, strict=True):
            assert ids == res.token_ids and text == res.text
        counts = transport.counts
        assert counts.get("open_streams", 0) >= 1, counts
        assert counts.get("open_stream", 0) + counts["open_streams"] == admissions < N, counts


def test_one_refused_admission_does_not_refuse_the_others(
        site_transport: Any, direct: tuple[Fabric, CountingTransport]) -> None:
    """``open_streams`` answers each admission on its own: an unknown model, a prompt too
    long for the context and a malformed entry get their own typed errors; the good ones
    are admitted and held until their first tokens, which are the model's."""
    from fabric.client.checks import build_request, sampling
    from fabric.errors import InvalidRequest, UnknownModel

    def body(prompt: str, model: str = TINY_MODEL, new: int = 16) -> dict[str, Any]:
        return build_request("generate", model=model, version=None, prompt=prompt,
                             sampling=sampling(new, 0.0, 1.0, 0, None, (), False),
                             timeout=None, hooks=None).model_dump(mode="json")

    want = direct[0].generate("Tell me about tides", model=TINY_MODEL, max_tokens=16)
    items = [{"request": body("Tell me about tides"), "mode": "poll", "hold_s": 5.0,
              "first_events": True},
             {"request": body("Tell me about tides", model="no-such-model"), "mode": "poll"},
             {"request": body("tides " * 400, new=300), "mode": "poll"},
             {"mode": "poll"},
             {"request": body("Tell me about waves"), "mode": "direct"}]
    answers = site_transport.submit(functions.open_streams, items, None).result(timeout=120)
    assert len(answers) == len(items)
    errors = [FabricError.from_dict(a["error"]) if a.get("error") else None for a in answers]
    assert errors[0] is None and errors[4] is None
    assert isinstance(errors[1], UnknownModel)
    assert isinstance(errors[2], ContextLengthExceeded)
    assert isinstance(errors[3], InvalidRequest) and "request" in str(errors[3])
    held = answers[0]["info"]
    inline = [int(t) for e in held["events"] for t in e.get("token_ids") or []]
    assert inline and inline == want.token_ids[:len(inline)]
    assert answers[4]["info"]["mode"] == "direct" and answers[4]["info"]["ticket"]
    with pytest.raises(InvalidRequest):  # not a list of admissions at all
        site_transport.submit(functions.open_streams, [], None).result(timeout=60)


def test_status_shows_the_workers_running(local_site: Any) -> None:
    """``fabric endpoint status`` counts the workers the engine's pool reports, not the
    configured number (2 here; the pool may still be starting right after the site)."""
    from fabric.cli.endpoint import format_status
    from fabric.client.local import site_status

    deadline = time.monotonic() + 60
    while True:
        status = site_status(str(local_site.site_dir), local_site.state_dir, health=False)
        assert status is not None
        if status["workers_running"] == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status["workers"] == 2 and status["workers_running"] == 2
    assert "workers     2 running" in format_status(status)


def test_a_final_only_poll_waits_for_the_end(direct: tuple[Fabric, CountingTransport]) -> None:
    """The server answers a ``final`` poll at the request's end, not at its first token (the
    site's long-poll for a plain request is one round trip, not one per token)."""
    from fabric.client.checks import build_request, sampling

    fab, _ = direct
    fab.generate("warm", model=TINY_MODEL, max_tokens=1)

    def admit(prompt: str, new: int) -> dict:
        request = build_request("generate", model=TINY_MODEL, version=None, prompt=prompt,
                                sampling=sampling(new, 0.0, 1.0, 0, None, (), False),
                                timeout=None, hooks=None)
        return dict(fab.transport.submit(functions.open_stream, request.model_dump(mode="json"),
                                         None, "poll").result(timeout=60))

    # Each poll right after its own admission: on a loaded machine the long request could
    # otherwise finish while the second one is being admitted.
    first = admit("Tell me about tides", 400)
    with ServerClient(first["address"], first["public_key"]) as client:
        every = client.poll(first["request_id"], first["ticket"], 0, 30.0)
        second = admit("Tell me about waves", 200)
        end = client.poll(second["request_id"], second["ticket"], 0, 30.0, final=True)
    assert not every["done"] and 1 <= every["cursor"] < 400
    assert end["done"] and end["result"]["usage"]["completion_tokens"] >= 1


def test_with_auth_twins_share_the_connection_threads(
        direct: tuple[Fabric, CountingTransport]) -> None:
    """A gateway holds one ``with_auth`` twin per caller. Twins share the client's direct
    connections and admission queue: six callers' requests and streams start no thread
    (each twin started an admission thread and a connection thread of its own, kept for its
    life: two per caller a gateway ever served) and get the owner's answers."""
    fab, _ = direct
    expected = fab.generate("The cell", model=TINY_MODEL, max_tokens=6)
    assert "".join(fab.stream("The cell", model=TINY_MODEL, max_tokens=6)) == expected.text
    before = {t.ident for t in threading.enumerate()}
    twins = [fab.with_auth({"token": f"caller-{i}"}) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(lambda twin: (
            twin.generate("The cell", model=TINY_MODEL, max_tokens=6).text,
            "".join(twin.stream("The cell", model=TINY_MODEL, max_tokens=6))), twins))
        started = [t.name for t in threading.enumerate()
                   if t.ident not in before and not t.name.startswith("ThreadPoolExecutor")]
    assert texts == [(expected.text, expected.text)] * 6
    assert started == []
    for twin in twins:
        twin.close()
    assert fab.generate("The cell", model=TINY_MODEL, max_tokens=6).text == expected.text
