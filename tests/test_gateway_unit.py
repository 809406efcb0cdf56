"""The gateway without a site: API keys, who may call, rate limits, the bind rule, errors.

Requests go to a real uvicorn server on 127.0.0.1 (a random free port) through ``httpx``; the
routes used here fail or answer before any call reaches a site, so no site is started.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from fabric.errors import (
    AuthError,
    EndpointError,
    InvalidRequest,
    ModelServerUnavailable,
    Overloaded,
    QuotaExceeded,
    RequestTooLarge,
    UnknownModel,
)
from fabric.gateway import GatewayConfig, create_app
from fabric.gateway.auth import Authenticator, Identity, RateLimiter
from fabric.gateway.config import is_loopback
from fabric.gateway.errors import error_body, retry_after, status_of
from fabric.gateway.keys import KeyStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(app: Any) -> Iterator[str]:
    """``app`` under a real uvicorn server on 127.0.0.1; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


# -- keys ------------------------------------------------------------------------------------


def test_keys_are_stored_hashed_and_private(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    key, record = store.create("alice")
    assert key.startswith("fab-") and len(key) > 40
    text = store.path.read_text()
    assert key not in text and record.sha256 in text
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert store.verify(key) == record and store.verify(key + "x") is None
    assert store.active() == 1
    store.revoke(record.id)
    assert store.verify(key) is None and store.active() == 0
    assert [k.name for k in store.all()] == ["alice"]


def test_keys_cli(tmp_path: Path) -> None:
    fabric = [sys.executable, "-m", "fabric.cli.main", "keys", "--home", str(tmp_path)]
    created = subprocess.run([*fabric, "create", "bob", "--json"], capture_output=True,
                             text=True, check=True)
    import json

    key = json.loads(created.stdout)
    assert KeyStore(tmp_path).verify(key["key"]) is not None
    listed = subprocess.run([*fabric, "list"], capture_output=True, text=True, check=True)
    assert "bob" in listed.stdout and key["key"] not in listed.stdout
    subprocess.run([*fabric, "revoke", key["id"]], check=True, capture_output=True)
    assert KeyStore(tmp_path).verify(key["key"]) is None
    bad = subprocess.run([*fabric, "revoke", "nobody"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no active key" in bad.stderr
    # As a shell captures it (KEY=$(fabric keys create carol)): the key alone on stdout.
    plain = subprocess.run([*fabric, "create", "carol"], capture_output=True, text=True,
                           check=True)
    assert KeyStore(tmp_path).verify(plain.stdout.strip()) is not None
    assert "not shown again" in plain.stderr


# -- who may call ----------------------------------------------------------------------------


def test_identify(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path)
    key, _ = keys.create("carol")
    open_ = Authenticator(require=False, keys=keys)
    assert open_.identify(None).name == "local"
    assert open_.identify("Bearer EMPTY").name == "local"  # what OpenAI clients send
    assert open_.identify(f"Bearer {key}").name == "carol"
    closed = Authenticator(require=True, keys=keys)
    assert closed.identify(f"Bearer {key}").name == "carol"
    assert closed.identify(f"bearer {key}").name == "carol"  # the scheme is case-insensitive
    for header in (None, "Bearer fab-nope", "Bearer some-globus-token", f"Basic {key}"):
        with pytest.raises(AuthError):
            closed.identify(header)


def test_rate_limiter_refills() -> None:
    limiter = RateLimiter(rate=50.0, burst=2)
    limiter.take("a")
    limiter.take("a")
    limiter.take("b")  # buckets are per identity
    with pytest.raises(QuotaExceeded) as err:
        limiter.take("a")
    assert 0 < err.value.details["retry_after"] <= 0.02 + 1e-9
    time.sleep(0.03)
    limiter.take("a")
    RateLimiter(rate=0, burst=1).take("a")  # off
    # An idle caller saves up to ``burst`` requests, no more: 0.2 s at 50/s earns 10.
    time.sleep(0.2)
    limiter.take("b")
    limiter.take("b")
    with pytest.raises(QuotaExceeded):
        limiter.take("b")


def test_bind_rule(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    GatewayConfig().check_bind(0, False)
    public = GatewayConfig(host="0.0.0.0")
    assert public.auth_required
    with pytest.raises(AuthError, match="fabric keys create"):
        public.check_bind(0, False)
    public.check_bind(1, False)
    public.check_bind(0, True)
    with pytest.raises(AuthError):
        GatewayConfig(host="0.0.0.0", require_auth=False).check_bind(1, False)


def test_serve_refuses_a_public_bind_without_keys(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fabric.cli.main", "serve", "--host", "0.0.0.0", "--port",
         str(free_port()), "--home", str(tmp_path)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "refusing to serve on 0.0.0.0" in proc.stderr and "fabric keys create" in proc.stderr


# -- errors ----------------------------------------------------------------------------------


def test_error_mapping() -> None:
    assert status_of(UnknownModel("x"))[0] == 404
    assert status_of(QuotaExceeded("x"))[0] == 429
    assert status_of(RequestTooLarge("x"))[:2] == (413, "invalid_request_error")
    busy = Overloaded("full", retry_after=2.2)
    assert status_of(busy)[0] == 429 and retry_after(busy) == 3
    from fabric.gateway.app import fabric_error_response

    for unavailable in (ModelServerUnavailable("restarting"), EndpointError("down")):
        reply = fabric_error_response(unavailable)
        assert reply.status_code == 503 and int(reply.headers["Retry-After"]) >= 1
    body = error_body(UnknownModel("no such model", param="model"))
    assert body == {"error": {"message": "no such model", "type": "invalid_request_error",
                              "param": "model", "code": "model_not_found"}}


@pytest.fixture
def keyed_server(tmp_path: Path) -> Iterator[tuple[str, str, KeyStore]]:
    """A gateway that requires keys (rate 1/s, burst 2) with one key issued."""
    keys = KeyStore(tmp_path)
    key, _ = keys.create("dave")
    config = GatewayConfig(home=tmp_path, require_auth=True, rate=1.0, burst=2)
    with running_server(create_app(config)) as url:
        yield url, key, keys


def test_http_auth_and_rate_limit(keyed_server: tuple[str, str, KeyStore]) -> None:
    url, key, keys = keyed_server
    with httpx.Client(base_url=url, timeout=30) as http:
        missing = http.post("/v1/chat/completions", json={})
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"
        bad = http.post("/v1/chat/completions", json={}, headers={"Authorization": "Bearer x"})
        assert bad.status_code == 401
        auth = {"Authorization": f"Bearer {key}"}
        # Authenticated: the body is checked (400, OpenAI's shape, the field named).
        invalid = http.post("/v1/chat/completions", json={"model": "m"}, headers=auth)
        assert invalid.status_code == 400
        assert invalid.json()["error"]["param"] == "messages"
        # A bad value of a known field is refused; an unknown field is not (it gets past the
        # body check to the messages' role check).
        wrong = http.post("/v1/chat/completions", headers=auth, json={
            "model": "m", "messages": [{"role": "robot", "content": "x"}], "frobnicate": 1})
        assert wrong.status_code == 400 and "role" in wrong.json()["error"]["message"]
        limited = http.post("/v1/chat/completions", json={}, headers=auth)
        assert limited.status_code == 429
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        # Another key has its own bucket: dave's limit does not hold erin back.
        erin, _ = keys.create("erin")
        other = http.post("/v1/chat/completions", json={},
                          headers={"Authorization": f"Bearer {erin}"})
        assert other.status_code == 400, other.text
        keys.revoke("dave")
        revoked = http.post("/v1/chat/completions", json={}, headers=auth)
        assert revoked.status_code == 401
        unknown = http.get("/v1/nothing", headers=auth)
        assert unknown.status_code == 404 and "error" in unknown.json()


def test_a_body_over_the_limit_is_refused_sized_or_chunked(tmp_path: Path) -> None:
    """``max_body_bytes`` holds whether the body says its size (``Content-Length``) or is
    chunked (no size given: it is counted as it arrives), for requests and uploads alike; a
    body within it still gets through, and the gateway keeps serving."""
    config = GatewayConfig(home=tmp_path, rate=0, max_body_bytes=1024)
    big = json.dumps({"model": "m", "messages": [{"role": "robot", "content": "x" * 200_000}]})
    small = json.dumps({"model": "m", "messages": [{"role": "robot", "content": "x"}]})

    def chunked(body: bytes) -> Iterator[bytes]:
        for i in range(0, len(body), 256):
            yield body[i:i + 256]

    def upload(data: bytes) -> tuple[bytes, str]:
        boundary = "b0undary"
        parts = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
                 f"batch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                 f"filename=\"in.jsonl\"\r\n\r\n").encode()
        return parts + data + f"\r\n--{boundary}--\r\n".encode(), \
            f"multipart/form-data; boundary={boundary}"

    with running_server(create_app(config)) as url, httpx.Client(base_url=url, timeout=30) as http:
        headers = {"content-type": "application/json"}
        for content in (big.encode(), chunked(big.encode())):
            refused = http.post("/v1/chat/completions", content=content, headers=headers)
            assert refused.status_code == 413, refused.text
            assert refused.json()["error"]["code"] == "payload_too_large"
            assert "1024 bytes" in refused.json()["error"]["message"]
        within = http.post("/v1/chat/completions", content=chunked(small.encode()),
                           headers=headers)
        assert within.status_code == 400 and "role" in within.json()["error"]["message"]
        body, kind = upload(b'{"custom_id": "a"}\n' * 200)
        for content in (body, chunked(body)):
            refused = http.post("/v1/files", content=content, headers={"content-type": kind})
            assert refused.status_code == 413, refused.text
            assert "upload" in refused.json()["error"]["message"]
        body, kind = upload(b'{"custom_id": "a"}\n')
        stored = http.post("/v1/files", content=chunked(body), headers={"content-type": kind})
        assert stored.status_code == 200, stored.text
        assert stored.json()["bytes"] == len(b'{"custom_id": "a"}\n')


def test_what_the_models_cannot_do_is_refused_not_ignored(tmp_path: Path) -> None:
    """A forced tool call or structured output would come back as plain text if ignored:
    refused (400, the field named). ``tools`` with ``tool_choice: auto`` is not refused (the
    request gets past the body check, to the role check here)."""
    config = GatewayConfig(home=tmp_path, rate=0)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with running_server(create_app(config)) as url, httpx.Client(base_url=url, timeout=30) as http:
        for field, value in (("tool_choice", "required"),
                             ("tool_choice", {"type": "function", "function": {"name": "f"}}),
                             ("response_format", {"type": "json_object"}),
                             ("response_format", {"type": "json_schema", "json_schema": {}})):
            refused = http.post("/v1/chat/completions",
                                json={**body, "tools": tools, field: value})
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"] == field
        tolerated = http.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "robot", "content": "x"}], "tools": tools,
            "tool_choice": "auto", "response_format": {"type": "text"}})
        assert tolerated.status_code == 400 and "role" in tolerated.json()["error"]["message"]


def test_bad_fields_are_named_as_the_client_wrote_them(tmp_path: Path) -> None:
    """400s name the field as written (``messages[0]``, ``prompt``), say what is accepted,
    and carry no pydantic wording (``Value error,``, union members such as ``prompt.str``)."""
    config = GatewayConfig(home=tmp_path, rate=0)
    cases = [("/v1/completions", {"model": "m", "prompt": [1, 2, 3]}, "prompt",
              "token ids are not accepted"),
             ("/v1/embeddings", {"model": "m", "input": [[1, 2]]}, "input",
              "a non-empty list of strings"),
             ("/v1/chat/completions", {"model": "m", "messages": ["x"]}, "messages[0]",
              "should be an object"),
             ("/v1/chat/completions", {"model": "m", "messages": []}, "messages",
              "give at least one message")]
    with running_server(create_app(config)) as url, httpx.Client(base_url=url, timeout=30) as http:
        for path, body, param, says in cases:
            error = http.post(path, json=body).json()["error"]
            assert error["param"] == param, error
            assert says in error["message"] and "Value error" not in error["message"], error
            assert ".str" not in error["message"] and "list[str]" not in error["message"]


def test_globus_token_is_introspected_and_passed_on(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A Globus token is checked by the site policy's own introspection (canned Globus Auth
    answers, offline) and then travels with the caller's calls to the site."""
    import responses
    from globus_sdk.testing import RegisteredResponse, load_response

    from fabric.aio import AsyncFabric
    from fabric.endpoint import policy
    from fabric.gateway.state import Gateway
    from fabric.sitepolicy import PolicyConfig

    client_id = "0b6e5c4a-0f5c-4e5b-9f0d-0000000000ec"
    site_policy = PolicyConfig(client_id=client_id)
    monkeypatch.setenv("FABRIC_ENDPOINT_CLIENT_SECRET", "endpoint-secret")
    policy.clear_cache()

    def introspect(active: bool) -> None:
        body: dict[str, Any] = {"active": False}
        if active:
            body = {"active": True, "scope": site_policy.resolved_scope, "sub": "a1",
                    "username": "alice@uchicago.edu", "exp": time.time() + 600,
                    "aud": [client_id]}
        load_response(RegisteredResponse(service="auth", path="/v2/oauth2/token/introspect",
                                         method="POST", json=body))

    authn = Authenticator(require=True, keys=KeyStore(tmp_path), policy=site_policy,
                          site="polaris")
    responses.start()
    try:
        introspect(True)
        alice = authn.identify("Bearer ALICE-TOKEN")
        assert (alice.name, alice.kind) == ("alice@uchicago.edu", "globus")
        assert alice.auth == {"scheme": "globus", "token": "ALICE-TOKEN", "site": "polaris"}
        policy.clear_cache()
        responses.reset()
        introspect(False)
        with pytest.raises(AuthError, match="not active"):
            authn.identify("Bearer STALE-TOKEN")
    finally:
        responses.stop()
        responses.reset()
        policy.clear_cache()
    gateway = Gateway(GatewayConfig(home=tmp_path), AsyncFabric(on_status=None), authn)
    try:
        mine = gateway.client_for(alice)
        assert mine.fabric.auth == alice.auth and mine is gateway.client_for(alice)
        assert gateway.client_for(Identity("bob", "key")) is gateway.client
    finally:
        gateway.close()


def test_the_gateway_forgets_the_least_recently_seen_caller(tmp_path: Path) -> None:
    """With room for two callers' clients, a third caller's pushes out the one seen least
    recently, not the one that came first."""
    from fabric.aio import AsyncFabric
    from fabric.gateway.state import Gateway

    def globus(name: str) -> Identity:
        return Identity(name, "globus", {"scheme": "globus", "token": f"{name}-TOKEN"})

    alice, bob, carol = globus("alice"), globus("bob"), globus("carol")
    gateway = Gateway(GatewayConfig(home=tmp_path, callers_kept=2), AsyncFabric(on_status=None),
                      Authenticator(require=True, keys=KeyStore(tmp_path)))
    try:
        first_alice, first_bob = gateway.client_for(alice), gateway.client_for(bob)
        assert gateway.client_for(alice) is first_alice  # alice is now the most recent
        gateway.client_for(carol)
        assert gateway.client_for(alice) is first_alice
        assert gateway.client_for(bob) is not first_bob  # forgotten: a new client
        assert len(gateway._clients) == 2
    finally:
        gateway.close()


# -- SSE pieces ------------------------------------------------------------------------------


class _Chunks:
    """Stands in for an ``AsyncStream``: its chunks (an exception is raised in its place),
    the attributes ``pieces`` reads, and how often it was asked to close."""

    def __init__(self, chunks: list[Any]) -> None:
        self._chunks = list(chunks)
        self.last_token_ids: list[int] = []
        self.last_logprobs: list[float] = []
        self.last_tops: list[list[tuple[int, float]]] = []
        self.closed = 0

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> str:
        if not self._chunks:
            raise StopAsyncIteration
        item = self._chunks.pop(0)
        if isinstance(item, BaseException):
            raise item
        self.last_token_ids = [len(item)]
        return str(item)

    def close_soon(self) -> None:
        self.closed += 1


def test_pieces_of_one_stream_and_of_several() -> None:
    import asyncio

    from fabric.errors import ModelServerUnavailable
    from fabric.gateway.streams import pieces

    async def collect(streams: list[Any], stop_after: int | None = None) -> list[Any]:
        out: list[Any] = []
        gen: Any = pieces(streams)
        try:
            async for piece in gen:
                out.append((piece.index, piece.text, piece.token_ids))
                if stop_after is not None and len(out) == stop_after:
                    break
        finally:
            await gen.aclose()
        return out

    one = _Chunks(["ab", "c"])
    assert asyncio.run(collect([one])) == [(0, "ab", [2]), (0, "c", [1]), (0, None, [])]
    assert one.closed == 1
    # A client that goes away after the first chunk: the stream is closed (cancelled).
    left = _Chunks(["ab", "c", "d"])
    assert asyncio.run(collect([left], stop_after=1)) == [(0, "ab", [2])]
    assert left.closed == 1
    broken = _Chunks(["ab", ModelServerUnavailable("gone")])
    with pytest.raises(ModelServerUnavailable):
        asyncio.run(collect([broken]))
    assert broken.closed == 1
    a, b = _Chunks(["x", "y"]), _Chunks(["z"])
    got = asyncio.run(collect([a, b]))
    assert sorted(got, key=lambda p: (p[0], p[1] is None)) == [
        (0, "x", [1]), (0, "y", [1]), (0, None, []), (1, "z", [1]), (1, None, [])]
    assert (a.closed, b.closed) == (1, 1)


@pytest.mark.parametrize(("size", "where"), [(1000, "loop"), ((1 << 20) + 1000, "thread")])
def test_a_large_body_is_parsed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch, size: int,
                                                   where: str) -> None:
    """A body of megabytes takes seconds to validate: it must not stall every other caller's
    stream on the event loop they share, while a small one is not worth a thread."""
    import asyncio

    from pydantic import BaseModel, field_validator

    from fabric.gateway import routes

    seen: list[str] = []

    class Probe(BaseModel):
        data: str

        @field_validator("data")
        @classmethod
        def where_parsed(cls, value: str) -> str:
            try:
                asyncio.get_running_loop()
                seen.append("loop")
            except RuntimeError:
                seen.append("thread")
            return value

    body = json.dumps({"data": "x" * size}).encode()

    async def read(request: Any) -> bytes:
        return body

    monkeypatch.setattr(routes, "read_body", read)
    parsed = asyncio.run(routes.parse_body(None, Probe))  # type: ignore[arg-type]
    assert len(parsed.data) == size and seen == [where]


def test_one_callers_files_and_batches_are_not_anothers(tmp_path: Path) -> None:
    """Two keys: what carol uploads or runs, dave can neither list, read, download, delete
    nor cancel (404, as for an id that does not exist); carol still can."""
    keys = KeyStore(tmp_path)
    carol, _ = keys.create("carol")
    dave, _ = keys.create("dave")
    config = GatewayConfig(home=tmp_path, require_auth=True, rate=0)
    as_carol = {"Authorization": f"Bearer {carol}"}
    as_dave = {"Authorization": f"Bearer {dave}"}
    batch = {"id": "batch_0123abcd", "object": "batch", "owner": "carol", "status": "completed",
             "created_at": int(time.time()), "endpoint": "/v1/chat/completions"}
    folder = tmp_path / "batches"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{batch['id']}.json").write_text(json.dumps(batch))
    with running_server(create_app(config)) as url, httpx.Client(base_url=url, timeout=30) as http:
        stored = http.post("/v1/files", headers=as_carol,
                           files={"file": ("in.jsonl", b'{"custom_id": "a"}\n')},
                           data={"purpose": "batch"})
        assert stored.status_code == 200, stored.text
        file_id = stored.json()["id"]
        for method, path in (("GET", f"/v1/files/{file_id}"),
                             ("GET", f"/v1/files/{file_id}/content"),
                             ("DELETE", f"/v1/files/{file_id}"),
                             ("GET", f"/v1/batches/{batch['id']}"),
                             ("POST", f"/v1/batches/{batch['id']}/cancel")):
            assert http.request(method, path, headers=as_dave).status_code == 404, path
        assert http.get("/v1/files", headers=as_dave).json()["data"] == []
        assert http.get("/v1/batches", headers=as_dave).json()["data"] == []
        # Still all carol's: her own calls see them.
        assert [f["id"] for f in http.get("/v1/files", headers=as_carol).json()["data"]] == \
            [file_id]
        assert http.get(f"/v1/files/{file_id}/content", headers=as_carol).content == \
            b'{"custom_id": "a"}\n'
        assert http.get(f"/v1/batches/{batch['id']}", headers=as_carol).status_code == 200
        assert [b["id"] for b in http.get("/v1/batches", headers=as_carol).json()["data"]] == \
            [batch["id"]]


# -- a client that hangs up on a non-stream completion ----------------------------------------


def test_a_hang_up_cancels_the_work_and_an_answer_is_untouched() -> None:
    """``unless_hung_up``: the client's disconnect cancels the awaited calls (499, to nobody);
    with the client still there, the calls' value or error comes back as it is."""
    import asyncio

    from starlette.exceptions import HTTPException

    from fabric.gateway.hangups import CLIENT_CLOSED, unless_hung_up

    class Request:
        def __init__(self, hang_up_after: float | None) -> None:
            self.after = hang_up_after

        async def receive(self) -> dict[str, Any]:
            if self.after is None:
                await asyncio.Event().wait()  # still connected
            await asyncio.sleep(self.after or 0)
            return {"type": "http.disconnect"}

    async def main() -> None:
        cancelled = asyncio.Event()

        async def long_call() -> str:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return "late"

        async def failing() -> str:
            raise InvalidRequest("bad")

        hanging_up: Any = Request(0.05)
        staying: Any = Request(None)
        with pytest.raises(HTTPException) as gone:
            await asyncio.wait_for(unless_hung_up(hanging_up, long_call()), 5)
        assert gone.value.status_code == CLIENT_CLOSED and cancelled.is_set()
        assert await unless_hung_up(staying, asyncio.sleep(0.01, "ok")) == "ok"
        with pytest.raises(InvalidRequest):
            await unless_hung_up(staying, failing())

    asyncio.run(main())
