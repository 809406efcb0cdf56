"""Hostile user functions and streams that stop early, on a real site and model server.

Issue 14 found a user function reading ``ticket.key`` and the CURVE secret in its request
worker, minting an operator ticket and re-pointing its handle at another model, and ten
generate calls through its handle recording 1 request and 0 tokens; direct streams recorded no
tokens at all. Here the function runs in its own process (``fabric.endpoint.sandbox``):

* its environment, argv, file descriptors and memory hold no site secret (the memory of its
  live process is scanned for the ticket key and the CURVE secret keys, with a marker of its
  own as the control that the scan finds what is there); the process scanned is the one its
  worker started before the call, as a spare (``fabric.endpoint.userchild``), so a spare holds
  none either;
* an operator ticket it mints with whatever key it can reach is refused by the server;
* another model, more requests or tokens than its capability allows, a tampered capability
  and an expired one are typed ``CapabilityDenied`` errors; a function that outlives its
  capability is killed (``DeadlineExceeded``);
* every request through its handle is recorded with its tokens, and so are the tokens of
  streams, direct ones closed early included (counted by the server, collected by the site).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from fabric import Fabric
from fabric.errors import CapabilityDenied, DeadlineExceeded, TicketInvalid
from tests.chaos.common import report
from tests.plugins.site import REPO_ROOT, TINY_MODEL, LocalSite

pytestmark = pytest.mark.slow  # a site process, a model server, user-function processes

MARKER = "marker-7f3a9c1e-only-in-the-user-function"


# -- functions shipped to the site (by reference: the site has the repo on PYTHONPATH) ---------

def look_for_secrets(handle: Any, pid_file: str, go_file: str, marker: str) -> dict[str, Any]:
    """What a hostile function finds in its own process, and an operator ticket it mints."""
    import sys as _sys

    from fabric import tickets as _tickets

    fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))  # before it opens anything
    held = marker  # kept alive in this frame while the test scans the process's memory
    minted = None
    with_key = ""
    try:  # what issue 14's function did: the site's context, its ticket key
        from fabric.endpoint.context import current

        key = current().ticket_key()
        with_key = hashlib.sha256(key).hexdigest()
        minted = _tickets.issue(key, model=str(handle.model), admin=True, subject="operator")
    except Exception as exc:  # whatever it is, it is not the site's key
        with_key = f"failed: {type(exc).__name__}"
    # Whole or not at all: the test reads the file as soon as it exists (CI read it empty).
    Path(pid_file + ".tmp").write_text(str(os.getpid()))
    os.replace(pid_file + ".tmp", pid_file)
    end = time.monotonic() + 120
    while not Path(go_file).exists() and time.monotonic() < end:
        time.sleep(0.05)
    import psutil

    return {"env": dict(os.environ), "argv": list(_sys.argv), "cwd": os.getcwd(),
            "fds": fds, "created": psutil.Process().create_time(),
            "key_sha": with_key, "minted": minted, "marker": held[:6]}


def hold(handle: Any, seconds: float) -> None:
    time.sleep(seconds)


def repoint(handle: Any, model: str) -> str:
    handle.model = model
    return str(handle.generate("hi", max_tokens=2).text)


def tamper(handle: Any) -> str:
    """Rewrite its capability's body (model and limits) and keep the signature."""
    import base64 as _b64
    import json as _json

    channel = handle._channel
    raw, sig = channel._capability.rsplit(".", 1)
    body = _json.loads(_b64.urlsafe_b64decode(raw))
    body.update(model="smollm2-135m", mxr=10**9, mxt=10**12, exp=body["exp"] + 10**6)
    channel._capability = _b64.urlsafe_b64encode(_json.dumps(body).encode()).decode() + "." + sig
    return str(handle.generate("hi", max_tokens=2).text)


def generate_n(handle: Any, n: int, max_tokens: int) -> list[Any]:
    """``n`` generate calls; each one's token usage as the server reported it, or the rule
    of the typed error that stopped it."""
    from fabric.errors import CapabilityDenied as _Denied

    out: list[Any] = []
    for i in range(n):
        try:
            r = handle.generate(f"Call number {i} of many", max_tokens=max_tokens)
            out.append(r.usage.prompt_tokens + r.usage.completion_tokens)
        except _Denied as exc:
            out.append(exc.details["rule"])
    return out


def sleep_then_generate(handle: Any, seconds: float) -> Any:
    time.sleep(seconds)
    return handle.generate("late", max_tokens=2).text


def sleep_forever(handle: Any) -> None:
    time.sleep(3600)


# -- helpers ------------------------------------------------------------------------------------

@pytest.fixture
def fab(site_transport: Any) -> Any:
    with Fabric(transport=site_transport, on_status=None) as client:
        yield client


def _sandbox_ctx(local_site: LocalSite, monkeypatch: pytest.MonkeyPatch, **limits: Any) -> Any:
    """The session site's context with other user-function limits, for calling the worker's
    side (``run_user_call``) from this process against the site's real model server."""
    from fabric.endpoint.context import SiteContext
    from fabric.sites import UserFunctionLimits, load_site

    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))  # the child imports this module
    site = load_site(str(local_site.site_dir))
    site = site.model_copy(update={"user_functions": UserFunctionLimits(**limits)})
    return SiteContext(site, local_site.state_dir)


def _run(ctx: Any, fn: Any, *args: Any) -> Any:
    from fabric.endpoint.sandbox import run_user_call
    from fabric.wire.usercode import pack_call, unpack_value

    return unpack_value(run_user_call(ctx, pack_call(fn, args, {}), model=TINY_MODEL,
                                      version=None, identity="tester", auth=None))


def _scan(pid: int, needles: dict[str, bytes]) -> dict[str, bool]:
    """Which of ``needles`` occur anywhere in the readable memory of process ``pid``."""
    found = dict.fromkeys(needles, False)
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line)
            if not m or m.group(3)[0] != "r" or "[vvar" in line or "[vsyscall" in line:
                continue
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except OSError:
                continue
            for name, needle in needles.items():
                found[name] = found[name] or needle in chunk
    return found


def _usage(state_dir: Path, model: str, since: float | None = None) -> tuple[int, int]:
    """(requests, tokens) recorded for ``model``: in the last day, or those that happened
    after the wall-clock time ``since`` (a server's tally is recorded with its own time)."""
    from fabric.endpoint.policy import usage

    rows = [r for r in (usage(state_dir) if since is None
                        else usage(state_dir, since_s=time.time() - since))
            if r["model"] == model]
    return sum(r["requests"] for r in rows), sum(r["tokens"] for r in rows)


def _wait_usage(state_dir: Path, model: str, want: tuple[int, int], timeout_s: float,
                since: float | None = None) -> tuple[int, int]:
    end = time.monotonic() + timeout_s
    got = _usage(state_dir, model, since)
    while (got[0] < want[0] or got[1] < want[1]) and time.monotonic() < end:
        time.sleep(0.5)
        got = _usage(state_dir, model, since)
    return got


# -- tests --------------------------------------------------------------------------------------

def test_user_function_process_holds_no_secret(fab: Fabric, local_site: LocalSite,
                                               tmp_path: Path) -> None:
    state = local_site.state_dir
    fab.generate("warm", model=TINY_MODEL, max_tokens=1)  # the key and a server exist
    secrets = {"ticket.key": (state / "ticket.key").read_bytes()}
    for i, path in enumerate(sorted(state.rglob("*.key_secret"))):
        secrets[f"curve{i}"] = path.read_bytes().strip()
    assert any(k.startswith("curve") for k in secrets)  # the model server's at least
    pid_file, go_file = tmp_path / "pid", tmp_path / "go"
    # Every worker busy at once: each has its context, so its spare, before the call below.
    for f in [fab.submit(hold, 1.0, model=None) for _ in range(int(local_site.info["workers"]))]:
        f.result(timeout=120)
    time.sleep(1.0)
    submitted = time.time()
    future = fab.submit(look_for_secrets, str(pid_file), str(go_file), MARKER, model=TINY_MODEL)
    end = time.monotonic() + 120
    while not pid_file.exists() and time.monotonic() < end:
        time.sleep(0.05)
    try:
        found = _scan(int(pid_file.read_text()), {"marker": MARKER.encode(), **secrets})
    finally:  # the function ends either way, not in a later test's usage window
        go_file.write_text("go")
    out = future.result(timeout=120)
    report("user-function secrets", inputs=len(secrets),
           leaked=sum(found[k] for k in secrets))
    assert found["marker"], "the scan must find what the process does hold"
    assert out["created"] < submitted  # a spare, started and waiting before the call
    assert not any(found[k] for k in secrets), found
    # Its environment is its own: no FABRIC_* (the site, the state dir), no policy secret.
    assert set(out["env"]) <= {"PATH", "PYTHONPATH", "HOME", "TMPDIR", "LANG",
                               "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
    assert out["env"]["HOME"] == out["cwd"] and str(state) not in " ".join(out["argv"])
    assert len(out["fds"]) <= 5, out["fds"]  # stdin/out/err, its socket, the listing's own
    assert out["key_sha"] != hashlib.sha256(secrets["ticket.key"]).hexdigest()
    # The operator ticket it minted with what it could reach is worthless to the server.
    dep = next(d for d in fab.deployments() if d["model"] == TINY_MODEL and d["state"] == "ready")
    if out["minted"]:
        from fabric.serverclient import ServerClient

        with ServerClient(dep["address"], dep["public_key"]) as client, \
                pytest.raises(TicketInvalid):
            client.drain(out["minted"])
    assert fab.generate("still here", model=TINY_MODEL, max_tokens=2).token_ids


def test_handle_cannot_be_repointed_or_forged(fab: Fabric) -> None:
    def smollm2() -> set[str]:  # other tests of the session may have deployed it already
        return {d["id"] for d in fab.deployments() if d["model"] == "smollm2-135m"}

    before = smollm2()
    with pytest.raises(CapabilityDenied) as err:
        fab.submit(repoint, "smollm2-135m", model=TINY_MODEL).result(timeout=120)
    assert err.value.details["rule"] == "capability.model"
    with pytest.raises(CapabilityDenied) as err:
        fab.submit(tamper, model=TINY_MODEL).result(timeout=120)
    assert err.value.details["rule"] == "capability.invalid"
    assert smollm2() <= before  # the refused call launched nothing


def test_capability_limits_and_expiry(local_site: LocalSite,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _sandbox_ctx(local_site, monkeypatch, max_requests=3)
    out = _run(ctx, generate_n, 5, 4)
    assert [type(x) for x in out[:3]] == [int] * 3 and out[3:] == ["capability.requests"] * 2
    ctx = _sandbox_ctx(local_site, monkeypatch, max_tokens=60)
    out = _run(ctx, generate_n, 6, 8)  # ~15 admitted tokens a call
    served = [x for x in out if isinstance(x, int)]
    assert out[len(served):] == ["capability.tokens"] * (6 - len(served)) and served
    # A call is admitted while what was really used plus its estimate fits the limit.
    assert sum(served[:-1]) <= 60
    ctx = _sandbox_ctx(local_site, monkeypatch, timeout_s=2.0)
    with pytest.raises(CapabilityDenied) as err:
        _run(ctx, sleep_then_generate, 3.0)  # within the grace period, past the expiry
    assert err.value.details["rule"] == "capability.expired"
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        _run(ctx, sleep_forever)
    assert time.monotonic() - started < 30
    report("capability limits", inputs=4, typed_errors=4)


def test_every_handle_request_is_recorded_with_its_tokens(fab: Fabric,
                                                          local_site: LocalSite) -> None:
    # Earlier tests' streams on this shared site are collected from the server at later
    # admissions (and by the reaper), so a total can grow inside this test (CI, twice: 4
    # tokens too many). Counted instead: what happened after this test began, by the time
    # each was recorded with (a server's tally: when its request ended). Let any stream an
    # earlier test cancelled end first.
    time.sleep(1.5)
    fab.generate("warm", model=TINY_MODEL, max_tokens=1)
    started = time.time()
    served = fab.submit(generate_n, 10, 6, model=TINY_MODEL).result(timeout=300)
    assert len(served) == 10 and all(isinstance(t, int) and t > 0 for t in served)
    want = (11, sum(served))  # the submit and its 10 requests
    got = _wait_usage(local_site.state_dir, TINY_MODEL, want, 20, since=started)
    report("user-function usage", inputs=10, lost=max(0, want[1] - got[1]))
    assert got == want


def test_stream_tokens_are_recorded_even_when_closed_early(fab: Fabric,
                                                           local_site: LocalSite) -> None:
    fab.generate("warm", model=TINY_MODEL, max_tokens=1)
    time.sleep(1.5)
    before = _usage(local_site.state_dir, TINY_MODEL)
    with fab.stream("A long story about the sea", model=TINY_MODEL, max_tokens=40) as full:
        text = "".join(full)
    assert full.result is not None and text == full.result.text
    whole = full.result.usage.prompt_tokens + full.result.usage.completion_tokens
    early = fab.stream("Another long story", model=TINY_MODEL, max_tokens=400)
    next(early)
    next(early)
    early.close()  # the client goes; the server has counted what it delivered
    got = _wait_usage(local_site.state_dir, TINY_MODEL,
                      (before[0] + 2, before[1] + whole + 2), 45)  # the site's reaper: 15 s
    report("stream usage", inputs=2, lost=int(got[1] < before[1] + whole + 2))
    assert got[0] == before[0] + 2  # two streams opened: two requests
    assert got[1] >= before[1] + whole + 2


def test_usage_op_needs_an_operator_ticket(fab: Fabric, local_site: LocalSite) -> None:
    """The tallies name identities: a caller's own ticket, or none, gets nothing."""
    from fabric import tickets
    from fabric.serverclient import ServerClient

    fab.generate("warm", model=TINY_MODEL, max_tokens=1)
    dep = next(d for d in fab.deployments() if d["model"] == TINY_MODEL and d["state"] == "ready")
    key = (local_site.state_dir / "ticket.key").read_bytes()
    callers = ["", "x.y", tickets.issue(key, model=TINY_MODEL, subject="alice"),
               tickets.issue(key, model=TINY_MODEL, subject="alice", account=True)]
    with ServerClient(dep["address"], dep["public_key"]) as client:
        for ticket in callers:
            with pytest.raises(TicketInvalid):
                client.usage(ticket, 10)
        operator = tickets.issue(key, model=TINY_MODEL, admin=True, subject="operator")
        assert isinstance(client.usage(operator, 10), list)
    report("usage op", inputs=len(callers), typed_errors=len(callers))
