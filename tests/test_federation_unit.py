"""Failover rules of a federation, with stand-in members (no site runs here).

The members are plain objects whose calls fail the way a site does (``Overloaded``,
``EndpointError``, ``UnknownModel``...); the site states come from a stand-in prober. What is
checked: the order sites are tried in, that a call never runs twice at one site, that a stream
moves only before its first token, and that routing counts what it did. Real sites:
``tests/test_federation.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric.client.federation import FailoverSource, Federation
from fabric.client.routing import ModelState, RoutingConfig, SiteState
from fabric.client.sitestate import SiteStates
from fabric.client.streaming import Stream
from fabric.errors import (
    Cancelled,
    DeploymentError,
    EndpointError,
    InvalidRequest,
    ModelServerUnavailable,
    Overloaded,
    QuotaExceeded,
    UnknownModel,
)

M = "tiny-llama"
RESULT = {"request_id": "r", "model": {"name": M, "version": "v", "sha256": "0" * 64},
          "text": "a", "token_ids": [1], "finish_reason": "length", "usage": {}, "timings": {}}


class Member:
    """A site stand-in: ``run`` returns its name or raises its next scripted error."""

    def __init__(self, name: str, errors: list[Exception] | None = None,
                 events: list[Any] | None = None) -> None:
        self.name = name
        self.errors = list(errors or [])
        self.events = events or [{"op": "event", "text": "a", "token_ids": [1]},
                                 {"op": "done", "result": RESULT}]
        self.calls = 0

    def run(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.name


class Source:
    """An event source replaying ``events`` (an exception in the list is raised there)."""

    def __init__(self, member: Member) -> None:
        self.member = member
        self.request_id = f"r-{member.name}"
        self.closed = self.abandoned = False

    def events(self) -> Iterator[dict[str, Any]]:
        for event in self.member.events:
            if isinstance(event, Exception):
                raise event
            yield event

    def cancel(self) -> str:
        return "running"

    def close(self) -> None:
        self.closed = True

    def abandon(self) -> None:
        self.abandoned = True


def federation(tmp_path: Path, members: dict[str, Member],
               states: dict[str, SiteState]) -> Federation:
    refs = []
    for name in members:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "fabric.yaml").write_text(f"name: {name}\n")
        refs.append(str(folder))
    by_ref = {str(tmp_path / n): m for n, m in members.items()}
    config = RoutingConfig(status_ttl_s=60, down_ttl_s=60)
    fed = Federation(refs, lambda ref: by_ref[ref], config)  # type: ignore[arg-type,return-value]
    fed.states.close()
    fed.states = SiteStates(fed.names, lambda name: states[name], config)
    return fed


def warm(name: str, load: int = 0) -> SiteState:
    return SiteState(name, True, {M: ModelState("ready", running=load)})


@pytest.fixture
def three(tmp_path: Path) -> tuple[Federation, dict[str, Member]]:
    members = {"a": Member("a"), "b": Member("b"), "c": Member("c")}
    fed = federation(tmp_path, members, {"a": warm("a", 5), "b": warm("b", 0),
                                         "c": SiteState("c", True, {})})
    return fed, members


def test_call_goes_to_the_lightest_warm_site(three: tuple[Federation, dict[str, Member]]
                                             ) -> None:
    fed, members = three
    assert fed.call(M, lambda m: m.run()) == ("b", "b")
    assert members["b"].calls == 1 and members["a"].calls == 0
    assert fed.stats.snapshot()["decisions"] == [
        {"model": M, "site": "b", "tier": "warm", "count": 1}]


@pytest.mark.parametrize("error", [Overloaded("full", retry_after=1),
                                   ModelServerUnavailable("died"), EndpointError("refused"),
                                   DeploymentError("launch failed"),
                                   QuotaExceeded("used up", retry_after=60)])
def test_fail_over_on_a_site_error_and_skip_that_site_next_time(
        three: tuple[Federation, dict[str, Member]], error: Exception) -> None:
    fed, members = three
    members["b"].errors = [error]
    assert fed.call(M, lambda m: m.run()) == ("a", "a")
    assert fed.stats.snapshot()["failovers"] == [
        {"model": M, "site": "b", "reason": type(error).__name__, "count": 1}]
    # b is marked down: the next call does not try it at all.
    assert fed.call(M, lambda m: m.run()) == ("a", "a")
    assert members["b"].calls == 1 and members["a"].calls == 2


def test_unknown_model_marks_only_that_model(three: tuple[Federation, dict[str, Member]]
                                             ) -> None:
    fed, members = three
    members["b"].errors = [UnknownModel("no such model")]
    assert fed.call(M, lambda m: m.run()) == ("a", "a")
    assert [r.site for r in fed.ranking(M)] == ["a", "c"]
    assert [r.site for r in fed.ranking("other")] == ["a", "b", "c"]  # b is healthy


def test_request_errors_are_not_failed_over(three: tuple[Federation, dict[str, Member]]
                                            ) -> None:
    fed, members = three
    members["b"].errors = [InvalidRequest("bad temperature")]
    with pytest.raises(InvalidRequest):
        fed.call(M, lambda m: m.run())
    assert members["a"].calls == 0 and members["c"].calls == 0


def test_every_site_tried_once_then_the_last_error(three: tuple[Federation, dict[str, Member]]
                                                   ) -> None:
    fed, members = three
    for m in members.values():
        m.errors = [Overloaded(f"{m.name} full")]
    with pytest.raises(Overloaded, match="c full"):
        fed.call(M, lambda m: m.run())
    assert [m.calls for m in members.values()] == [1, 1, 1]
    # Every site is marked down, so the next call asks them all again at once; they answer
    # now, so it is served.
    assert fed.call(M, lambda m: m.run())[1] in {"a", "b", "c"}
    # Sites that are down when asked again: the federation says so, naming each.
    for name in members:
        fed.states.mark_down(name, "EndpointError: refused")
    fed.states._prober = lambda name: SiteState(name, False, error="not running")
    with pytest.raises(EndpointError, match="no site of the federation") as info:
        fed.call(M, lambda m: m.run())
    assert set(info.value.details["sites"]) == {"a", "b", "c"}


def open_at(member: Member) -> Source:
    member.calls += 1
    if member.errors:
        raise member.errors.pop(0)
    return Source(member)


def test_stream_moves_when_opening_fails(three: tuple[Federation, dict[str, Member]]) -> None:
    fed, members = three
    members["b"].errors = [EndpointError("refused")]
    stream = Stream(FailoverSource(fed, M, open_at))  # type: ignore[arg-type]
    assert list(stream) == ["a"] and stream.site == "a"
    assert stream.result is not None and stream.result.site == "a"
    assert fed._in_flight == {}


def test_stream_moves_on_an_error_before_its_first_token(
        three: tuple[Federation, dict[str, Member]]) -> None:
    fed, members = three
    members["b"].events = [{"op": "event", "token_ids": []},
                           ModelServerUnavailable("server died")]
    stream = Stream(FailoverSource(fed, M, open_at))  # type: ignore[arg-type]
    assert list(stream) == ["a"] and stream.site == "a"
    assert members["b"].calls == 1 and members["a"].calls == 1


def test_stream_never_moves_after_a_token(three: tuple[Federation, dict[str, Member]]) -> None:
    fed, members = three
    members["b"].events = [{"op": "event", "text": "x", "token_ids": [7]},
                           ModelServerUnavailable("server died")]
    stream = Stream(FailoverSource(fed, M, open_at))  # type: ignore[arg-type]
    assert next(stream) == "x"
    with pytest.raises(ModelServerUnavailable):
        next(stream)
    assert stream.site == "b" and members["a"].calls == 0 and fed._in_flight == {}


def test_a_dropped_stream_is_abandoned_and_no_longer_counted(
        three: tuple[Federation, dict[str, Member]]) -> None:
    """A stream left unfinished without close is cancelled at its site when collected, and
    that site no longer counts it in flight (routing would take it for busier than it is)."""
    fed, _ = three
    opened: list[Source] = []

    def record(member: Member) -> Source:
        opened.append(open_at(member))
        return opened[-1]

    stream = Stream(FailoverSource(fed, M, record))  # type: ignore[arg-type]
    assert next(stream) == "a" and fed._in_flight == {"b": 1}
    del stream
    assert opened[0].abandoned and fed._in_flight == {}
    whole = Stream(FailoverSource(fed, M, record))  # type: ignore[arg-type]
    assert list(whole) == ["a"]
    del whole
    assert not opened[1].abandoned  # it finished: nothing to cancel


def test_stream_errors_of_the_request_itself_do_not_move(
        three: tuple[Federation, dict[str, Member]]) -> None:
    fed, members = three
    members["b"].events = [Cancelled("cancelled by its caller")]
    stream = Stream(FailoverSource(fed, M, open_at))  # type: ignore[arg-type]
    with pytest.raises(Cancelled):
        next(stream)
    assert members["a"].calls == 0


@pytest.mark.parametrize("streamed", [False, True])
def test_when_every_ranked_site_failed_the_others_are_asked_again(tmp_path: Path,
                                                                  streamed: bool) -> None:
    """b was left out of the first ranking (its status answer was late); a fails before any
    output: the call (or stream) asks every site again and b serves it, a is not retried."""
    members = {"a": Member("a", [ModelServerUnavailable("died")],
                           events=[ModelServerUnavailable("died")]), "b": Member("b")}
    states = {"a": warm("a"), "b": SiteState("b", False, error="status timed out")}
    fed = federation(tmp_path, members, states)
    fed.ranking(M)  # the cached states: only a
    states["b"] = warm("b")  # b answers now
    if streamed:
        stream = Stream(FailoverSource(fed, M, lambda m: Source(m)))  # type: ignore[arg-type]
        assert "".join(stream) == "a" and stream.site == "b"
    else:
        assert fed.call(M, lambda m: m.run()) == ("b", "b")
        assert members["a"].calls == 1
