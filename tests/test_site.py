"""The local site process: start, status, tasks through its GlobusComputeEngine, stop."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fabric import env
from fabric.client.local import LocalTransport, read_info, site_status, start_site, stop_site
from fabric.client.sitelife import site_running
from fabric.endpoint import functions
from fabric.endpoint.site import LOCK_PATIENCE_S
from fabric.errors import (
    EndpointError,
    FunctionNotAllowed,
    InvalidRequest,
    RequestTooLarge,
    UnknownModel,
    UserFunctionError,
)
from fabric.wire import framing, gcwire
from tests.plugins.ci import cannot_run
from tests.plugins.peers import HUNG_UP, NOBODY, connect_as_nobody
from tests.plugins.site import TINY_MODEL, LocalSite, wait_until, write_site


# Shipped by reference: the site's workers import this module (PYTHONPATH has the repo root).
def worker_pid() -> int:
    return os.getpid()


def worker_env() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in (env.FABRIC_SITE.name, env.FABRIC_STATE_DIR.name)}


def user_fn_raises(handle: Any, x: int) -> int:
    return 1 // x


def user_fn_returns_generator(handle: Any) -> Any:
    return (i for i in range(3))  # generators cannot be pickled, even by dill


def user_fn_ok(handle: Any, a: int, *, b: int) -> dict[str, Any]:
    return {"sum": a + b, "handle": repr(handle)}


def slow_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_endpoint_json_and_socket_are_private(local_site: LocalSite) -> None:
    info_file = local_site.state_dir / "endpoint.json"
    assert stat.S_IMODE(info_file.stat().st_mode) == 0o600
    info = json.loads(info_file.read_text())
    sock = Path(info["socket"])
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert info["address"] == f"unix:{sock}"
    assert info["pid"] == local_site.info["pid"] != os.getpid()
    assert info["state_dir"] == str(local_site.state_dir.resolve())


def test_status_reports_pid_address_and_deployments(local_site: LocalSite) -> None:
    status = site_status(str(local_site.site_dir), local_site.state_dir)
    assert status is not None
    assert status["pid"] == local_site.info["pid"]
    assert status["address"] == local_site.info["address"]
    assert status["state_dir"] == str(local_site.state_dir.resolve())
    assert isinstance(status["deployments"], list)


def test_task_runs_in_a_worker_with_the_site_env(site_transport: LocalTransport,
                                                 local_site: LocalSite) -> None:
    pid = site_transport.submit(worker_pid).result(timeout=120)
    assert pid not in (os.getpid(), local_site.info["pid"])
    seen = site_transport.submit(worker_env).result(timeout=60)
    assert seen[env.FABRIC_STATE_DIR.name] == str(local_site.state_dir.resolve())
    assert Path(str(seen[env.FABRIC_SITE.name])) == local_site.site_dir.resolve()


def test_many_threads_share_one_transport(site_transport: LocalTransport) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def call() -> None:
        value = site_transport.submit(worker_pid).result(timeout=120)
        with lock:
            results.append(value)

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 and all(isinstance(r, int) for r in results)


def _replace_info(path: Path, text: str) -> None:
    """Write ``endpoint.json`` as a site does: a new file renamed into place."""
    tmp = path.with_name(".endpoint.json.test")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_a_connection_is_used_only_while_endpoint_json_names_its_site(
        local_site: LocalSite) -> None:
    """A site rewriting its own file keeps the client's connection; a file naming another
    process (a successor written while the old site still shuts down) stops its use: the
    call goes by the new file, not over the old site's connection."""
    path = local_site.state_dir / "endpoint.json"
    original = path.read_text()
    transport = local_site.transport()
    try:
        assert transport.submit(worker_pid).result(timeout=60) > 0
        conn = transport._conn
        _replace_info(path, original)  # same site, new inode
        assert transport.submit(worker_pid).result(timeout=60) > 0
        assert transport._conn is conn
        # another pid: this test's own process, which is no site, so no site is running
        _replace_info(path, json.dumps({**json.loads(original), "pid": os.getpid()}))
        with pytest.raises(EndpointError, match="not running"):
            transport.submit(worker_pid).result(timeout=60)
    finally:
        _replace_info(path, original)
        transport.close()
    again = local_site.transport()
    try:  # the site itself never noticed
        assert again.submit(worker_pid).result(timeout=60) > 0
    finally:
        again.close()


def test_futures_resolve_without_a_waiting_caller(site_transport: LocalTransport) -> None:
    """Callbacks and ``concurrent.futures.wait`` never call ``result()``: the I/O thread reads
    their replies, also right after a synchronous call read the reply socket itself."""
    import concurrent.futures as cf

    assert isinstance(site_transport.submit(worker_pid).result(timeout=120), int)
    called = threading.Event()
    seen: list[int] = []
    futures = [site_transport.submit(worker_pid) for _ in range(8)]
    futures[-1].add_done_callback(lambda f: (seen.append(f.result()), called.set()))
    _, pending = cf.wait(futures, timeout=60)
    assert not pending and all(isinstance(f.result(), int) for f in futures)
    assert called.wait(10) and isinstance(seen[0], int)


def test_bad_and_vanishing_clients_do_not_disturb_others(local_site: LocalSite,
                                                        site_transport: LocalTransport) -> None:
    """Garbage on the site socket closes that connection only; a client that leaves with a
    task running loses its reply, and the site serves everyone else throughout."""
    import socket

    path = local_site.info["socket"]
    garbage = [struct.pack("!I", 3) + b"\xc1\xc1\xc1",  # not msgpack
               struct.pack("!I", framing.MAX_MESSAGE_BYTES + 1),  # over the size limit
               framing.encode([b"T", b"not a task", b"short id"]),  # an id is 16 bytes
               framing.encode([b"X"])]  # no such kind
    for data in garbage:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(path)
            raw.sendall(data)
            raw.settimeout(30)
            if data.startswith(struct.pack("!I", 3)) or len(data) == 4:
                assert raw.recv(1) == b""  # the site hung up on this client
        assert isinstance(site_transport.submit(worker_pid).result(timeout=60), int)
    dropped = _replies_dropped(local_site)
    leaver = local_site.transport()
    leaver.submit(slow_pid, 1.0)
    leaver.close()  # gone before its reply exists
    pids = [site_transport.submit(slow_pid, 0.0) for _ in range(4)]
    assert all(isinstance(f.result(timeout=60), int) for f in pids)
    wait_until(lambda: _replies_dropped(local_site) > dropped, 60,
               "the site to drop the reply of the client that left")
    assert isinstance(site_transport.submit(worker_pid).result(timeout=60), int)
    assert read_info(local_site.state_dir)["pid"] == local_site.info["pid"]


def test_a_connection_from_another_user_is_closed(local_site: LocalSite,
                                                  site_transport: LocalTransport) -> None:
    """The site serves its own user only: a connection whose peer is another user (here
    made as ``nobody``, reaching the private socket as root would) is closed before any
    message, and logged; the site keeps serving its user."""
    if os.geteuid() != 0:
        cannot_run("connecting as another user needs root")
    assert connect_as_nobody(local_site.info["socket"]) == HUNG_UP
    log = local_site.state_dir / "logs" / "site.log"
    wait_until(lambda: f"refused a connection from uid {NOBODY}" in log.read_text(), 30,
               "the refusal in site.log")
    assert isinstance(site_transport.submit(worker_pid).result(timeout=60), int)


def test_a_request_over_the_message_limit_is_refused_typed(
        site_transport: LocalTransport) -> None:
    """A request bigger than the site reads in one message is refused before it is sent
    (the site hung up on it, and every call in flight on that connection failed with it)."""
    running = site_transport.submit(slow_pid, 1.0)
    huge = {"model": TINY_MODEL, "prompt": "x" * (framing.MAX_MESSAGE_BYTES + 1)}
    with pytest.raises(RequestTooLarge, match=f"at most {framing.MAX_MESSAGE_BYTES} bytes") \
            as refused:
        site_transport.submit(functions.run_request, huge)
    assert refused.value.details["limit"] == framing.MAX_MESSAGE_BYTES
    assert isinstance(running.result(timeout=60), int)  # the call in flight is unharmed
    assert isinstance(site_transport.submit(worker_pid).result(timeout=60), int)


class CreatesFile:
    """Unpickling this creates a file: what a hostile pickled argument could do, harmlessly."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_pickled_arguments_of_fabric_functions_are_refused(local_site: LocalSite,
                                                           tmp_path: Path) -> None:
    """The site reads no caller pickle for the fabric's own functions: a hand-made task for
    ``run_request`` whose argument is pickled gets a typed ``AccessDenied``, and the argument is
    never unpickled (the file its unpickling would create does not appear)."""
    import socket
    import uuid

    from globus_compute_sdk.serialize import ComputeSerializer

    from fabric.errors import AccessDenied

    marker = tmp_path / "unpickled"
    task_id, packed = gcwire.pack_task(functions.run_request, (CreatesFile(str(marker)), None),
                                       {}, serializer=ComputeSerializer())  # dill data
    assert isinstance(task_id, uuid.UUID)
    assert gcwire.admission_refusal(packed, user_functions=True) is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(local_site.info["socket"])
        raw.settimeout(60)
        raw.sendall(framing.encode([framing.TASK, packed, task_id.bytes]))
        reader, replies = framing.Reader(), []
        while not replies:
            data = raw.recv(65536)
            assert data, "the site hung up"
            replies = reader.feed(data)
    kind, key, result = replies[0]
    assert kind == framing.RESULT and key == str(task_id).encode()
    with pytest.raises(AccessDenied) as err:
        gcwire.unpack_result(result)
    assert err.value.details == {"function": "run_request", "rule": "data-serializers",
                                 "accepted": "JSONData"}
    assert not marker.exists()


def _replies_dropped(site: LocalSite) -> int:
    status = site_status(str(site.site_dir), site.state_dir, health=False)
    assert status is not None
    return int(status["replies_dropped"])


def test_remote_fabric_errors_are_typed(site_transport: LocalTransport) -> None:
    with pytest.raises(UnknownModel) as info:
        site_transport.submit(functions.run_request,
                              {"model": "no-such-model", "prompt": "hi"}).result(timeout=120)
    assert "tiny-llama" in info.value.details["available"]
    with pytest.raises(InvalidRequest, match="prompt"):
        site_transport.submit(functions.run_request,
                              {"model": "tiny-llama", "prompt": "  "}).result(timeout=60)
    with pytest.raises(InvalidRequest, match="max_tokens"):
        site_transport.submit(functions.run_request, {
            "model": "tiny-llama", "prompt": "hi", "sampling": {"max_tokens": 0},
        }).result(timeout=60)


def _user_call(transport: LocalTransport, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fab.submit(fn, *args, **kwargs)`` with no model, through ``transport``."""
    from fabric.wire.usercode import ValueFuture, pack_call

    return ValueFuture(transport.submit(functions.run_user_function,
                                        pack_call(fn, args, kwargs), None))


def test_user_function_errors(site_transport: LocalTransport) -> None:
    ok = _user_call(site_transport, user_fn_ok, 2, b=3)
    assert ok.result(timeout=120)["sum"] == 5
    with pytest.raises(UserFunctionError) as info:
        _user_call(site_transport, user_fn_raises, 0).result(timeout=60)
    assert "ZeroDivisionError" in info.value.message
    assert "user_fn_raises" in info.value.details["traceback"]
    with pytest.raises(UserFunctionError, match="cannot be serialised"):
        _user_call(site_transport, user_fn_returns_generator).result(timeout=60)
    # The site keeps serving after each of these.
    assert isinstance(site_transport.submit(worker_pid).result(timeout=60), int)


def test_models_are_listed(site_transport: LocalTransport) -> None:
    models = {m["name"]: m for m in site_transport.submit(functions.list_models).result(60)}
    assert {"smollm2-135m", "minilm-l6", "tiny-llama"} <= set(models)
    assert models["tiny-llama"]["hosted"] and models["smollm2-135m"]["size"] == "135M"


def test_cli_status(local_site: LocalSite, capsys: pytest.CaptureFixture[str]) -> None:
    from fabric.cli.endpoint import main

    assert main(["endpoint", "status", "--site", str(local_site.site_dir),
                 "--state-dir", str(local_site.state_dir)]) == 0
    out = capsys.readouterr().out
    assert str(local_site.info["pid"]) in out and local_site.info["address"] in out


def test_user_functions_refused_where_not_allowed(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint function itself (called in-process, as a worker would)."""
    folder = write_site(tmp_path / "closed", allow_user_functions=False)
    monkeypatch.setenv(env.FABRIC_SITE.name, str(folder))
    monkeypatch.setenv(env.FABRIC_STATE_DIR.name, str(folder / "state"))
    from fabric.wire.usercode import pack_call

    reply = functions.run_user_function(pack_call(user_fn_ok, (1,), {"b": 1}), None)
    with pytest.raises(FunctionNotAllowed):
        gcwire.unwrap(reply)


@pytest.mark.slow  # starts a site process
def test_site_that_cannot_start_says_why(tmp_path: Path) -> None:
    folder = write_site(tmp_path / "broken")
    # Something that is not a socket sits where the site must listen.
    taken = framing.socket_path(folder / "state")
    (taken / "not-a-socket").mkdir(parents=True)
    try:
        with pytest.raises(EndpointError) as info:
            start_site(str(folder), folder / "state", timeout_s=120)
    finally:
        shutil.rmtree(taken)
    assert "exited" in info.value.message and str(taken) in info.value.message
    with pytest.raises(EndpointError, match="not running"):
        LocalTransport(site=str(folder), autostart=False).submit(worker_pid)


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line mentions ``text`` (leak check for the site's engine)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(int(proc.name))
    return found


def _wait_for(check: Any, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return bool(check())


@pytest.mark.slow  # starts a site three times (~18 s)
def test_autostart_sigterm_and_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A transport starts a stopped site on first use; SIGTERM and ``endpoint stop`` end it
    cleanly (no endpoint.json, no engine processes left behind)."""
    from fabric.cli.endpoint import main

    folder = write_site(tmp_path / "auto", workers=1)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    transport = LocalTransport(site=str(folder))
    try:
        assert isinstance(transport.submit(worker_pid).result(timeout=180), int)
        info = read_info(folder / "state")
        assert info is not None and transport.info is not None
        assert info["pid"] == transport.info["pid"]
        os.kill(info["pid"], signal.SIGTERM)
        assert _wait_for(lambda: read_info(folder / "state") is None)
        # The transport notices the site is gone: pending and new calls fail, typed.
        with pytest.raises(EndpointError):
            LocalTransport(site=str(folder), autostart=False).submit(worker_pid)
        # The first transport starts the site again on its next call, on a new connection.
        assert isinstance(transport.submit(worker_pid).result(timeout=180), int)
        again = read_info(folder / "state")
        assert again is not None and again["pid"] != info["pid"]
        assert transport.info is not None and transport.info["pid"] == again["pid"]
        assert stop_site(str(folder)) is not None
    finally:
        transport.close()
    assert not (folder / "state" / "endpoint.json").exists()
    assert _wait_for(lambda: not _processes_mentioning(str(folder)), 30)

    assert main(["endpoint", "start", "--site", str(folder)]) == 0
    assert "started" in capsys.readouterr().out
    assert main(["endpoint", "status", "--site", str(folder)]) == 0
    assert "deployments none" in capsys.readouterr().out
    assert main(["endpoint", "stop", "--site", str(folder)]) == 0
    assert "stopped" in capsys.readouterr().out
    assert read_info(folder / "state") is None
    assert stop_site(str(folder)) is None
    assert main(["endpoint", "status", "--site", str(folder)]) == 3
    assert _wait_for(lambda: not _processes_mentioning(str(folder)), 30)


def _site_with_a_server(folder: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
                        ) -> tuple[Path, str]:
    """A site of its own, started with one request to the tiny model (so its server runs);
    the site folder and its servers' folder (which their command lines mention)."""
    folder = write_site(folder, workers=1, model_dir=model_dir)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    transport = LocalTransport(site=str(folder))
    try:
        transport.submit(functions.run_request, {
            "model": TINY_MODEL, "prompt": "The cell",
            "sampling": {"max_tokens": 2}}).result(timeout=300)
    finally:
        transport.close()
    return folder, str(folder / "state" / "servers")


@pytest.mark.slow  # a site and a model server (~15 s)
def test_stop_all_stops_the_servers_a_stopped_site_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tiny_llama_dir: Path) -> None:
    """A plain stop leaves the model servers warm (they exit on their idle timeout); a later
    ``stop --all`` stops them although the site is down. It said only "not running" and left
    them running."""
    from fabric.cli.endpoint import main
    from fabric.endpoint.deployments import DeploymentManager
    from fabric.sites import load_site

    folder, servers = _site_with_a_server(tmp_path / "s", tiny_llama_dir, monkeypatch)
    try:
        assert main(["endpoint", "stop", "--site", str(folder)]) == 0
        capsys.readouterr()
        records = DeploymentManager(load_site(str(folder)), folder / "state").db
        [dep] = records.query(states=("ready",))
        assert _processes_mentioning(servers), "the plain stop stopped the server"
        # The site is down, its server is not: status says so (it said only "not running").
        assert main(["endpoint", "status", "--site", str(folder)]) == 3
        out = capsys.readouterr().out
        assert "is not running" in out and dep.id in out and "stop --all" in out, out
        assert main(["endpoint", "stop", "--all", "--site", str(folder)]) == 0
        out = capsys.readouterr().out
        assert "is not running" in out and "stopped 1 model server" in out, out
        assert records.get(dep.id).state == "dead"  # type: ignore[union-attr]
        assert _wait_for(lambda: not _processes_mentioning(servers), 30)
    finally:
        for pid in _processes_mentioning(servers):  # whatever the outcome, none is left
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow  # a site and a model server (~20 s)
def test_stop_all_of_a_wedged_site_still_stops_its_servers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tiny_llama_dir: Path) -> None:
    """A site that does not answer (stopped here with SIGSTOP) is signalled away by
    ``stop --all``, and its model servers are stopped from its records: they were left
    running with "site stopped" printed."""
    from fabric.cli.endpoint import main

    folder, servers = _site_with_a_server(tmp_path / "w", tiny_llama_dir, monkeypatch)
    info = read_info(folder / "state")
    assert info is not None and _processes_mentioning(servers)
    try:
        os.kill(info["pid"], signal.SIGSTOP)
        assert main(["endpoint", "stop", "--all", "--timeout", "3", "--site", str(folder)]) == 0
        out = capsys.readouterr().out
        assert "did not answer" in out and "stopped 1 model server" in out, out
        assert not site_running(info["pid"])
        assert _wait_for(lambda: not _processes_mentioning(servers), 30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(info["pid"], signal.SIGKILL)
        for pid in _processes_mentioning(servers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow  # starts a site (~6 s)
def test_a_start_waits_for_a_stopping_site_to_let_go(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopping site removes ``endpoint.json`` at once (clients see it gone) but holds its
    state dir until its engine has shut down. A start meanwhile (the SDK's autostart right
    after a SIGTERM) waits for it to let go; it started a site that exited at once, "a site is
    already running" (CI, in ``test_autostart_sigterm_and_cli``)."""
    folder = write_site(tmp_path / "s", workers=1)
    (folder / "state").mkdir(parents=True)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    outcome: list[Any] = []

    def start() -> None:
        try:
            outcome.append(start_site(str(folder), timeout_s=120))
        except EndpointError as exc:
            outcome.append(exc)

    with (folder / "state" / "endpoint.lock").open("a") as stopping:
        fcntl.flock(stopping, fcntl.LOCK_EX)  # held as the stopping site holds it
        starter = threading.Thread(target=start)
        starter.start()
        starter.join(LOCK_PATIENCE_S + 1.5)  # longer than a new site waits for the lock
        assert starter.is_alive() and outcome == []
    starter.join(120)
    try:
        assert len(outcome) == 1 and isinstance(outcome[0], dict), outcome
        assert read_info(folder / "state") == outcome[0]
    finally:
        stop_site(str(folder))


def test_the_composition_root_wires_the_campaign_scheduler(tmp_path: Path) -> None:
    """``fabric.siteproc`` builds the site process with the campaign scheduler and the
    ``/metrics`` listener; the site module itself registers nothing (it knows nothing of
    campaigns)."""
    from fabric.campaign.site_scheduler import site_task
    from fabric.endpoint.site import SiteProcess
    from fabric.endpoint.site_metrics import metrics_task
    from fabric.siteproc import build

    folder = write_site(tmp_path / "site", name="wired")
    proc = build(str(folder), tmp_path / "state")
    assert proc.background_tasks == [site_task, metrics_task]
    assert SiteProcess.background_tasks == []
    assert proc.site.name == "wired" and proc.state_dir == (tmp_path / "state").resolve()
    assert proc.engine is None and proc.listener is None  # built, not started


def test_metrics_json_is_removed_when_the_site_stops(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``metrics.json`` advertises the ``/metrics`` listener only while the site runs: a
    stopped site leaves none naming a dead port (its daemon thread's cleanup once died with
    the process)."""
    folder = write_site(tmp_path / "m", workers=1, metrics={"enabled": True, "port": 0})
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    info = folder / "state" / "metrics.json"
    start_site(str(folder), timeout_s=180)
    try:
        wait_until(info.exists, 30, "metrics.json")
        assert json.loads(info.read_text())["port"] > 0
    finally:
        stop_site(str(folder), all=True)
    assert read_info(folder / "state") is None
    assert not info.exists()


def test_a_dead_sites_pid_held_by_another_process_is_not_the_site(tmp_path: Path) -> None:
    """A site killed with -9 leaves its ``endpoint.json``; once pids wrap, another process
    (another site, even) may hold that pid. It is not this site: ``read_info`` says no site
    runs and ``stop_site`` signals nothing (the full run once saw a fresh site SIGTERMed)."""
    import subprocess
    import sys

    state = tmp_path / "state"
    state.mkdir()
    other_state = tmp_path / "other"
    # A process that looks like another state dir's site, and one that is no site at all.
    impostors = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                          "fabric.siteproc", "--state-dir", str(other_state)]),
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])]
    try:
        for proc in impostors:
            (state / "endpoint.json").write_text(json.dumps({"pid": proc.pid,
                                                             "socket": str(state / "s")}))
            assert read_info(state) is None
            assert stop_site(str(write_site(tmp_path / "site")), state, timeout_s=2) is None
            assert proc.poll() is None  # still running: nobody signalled it
        # The site's own process (its --state-dir, however written) is the site.
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                 "fabric.siteproc", "--state-dir", str(state / ".")])
        impostors.append(proc)
        (state / "endpoint.json").write_text(json.dumps({"pid": proc.pid}))
        assert read_info(state) == {"pid": proc.pid}
    finally:
        for proc in impostors:
            proc.kill()
            proc.wait()


def _children(pid: int, marker: str) -> list[int]:
    """Children of ``pid`` whose command line contains ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and marker in cmdline:
            found.append(int(proc.name))
    return found


@pytest.mark.slow  # starts a site twice
def test_a_site_whose_interchange_died_answers_and_restarts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsl's interchange is killed under a site. The site used to block for ever in its next
    submission (its one serving thread, status and stop included). Now the task out and the
    next one are answered with a retryable ``EndpointError``, the site stops by itself, and
    the client's next call starts a new site that serves."""
    folder = write_site(tmp_path / "ix", workers=1)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    transport = LocalTransport(site=str(folder))
    try:
        assert isinstance(transport.submit(worker_pid).result(timeout=180), int)
        info = read_info(folder / "state")
        assert info is not None
        (interchange,) = _children(info["pid"], "HTEX interchange")
        running = transport.submit(slow_pid, 30.0)  # out when the interchange dies
        time.sleep(0.5)
        os.kill(interchange, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(EndpointError, match="interchange exited") as lost:
            running.result(timeout=60)
        assert lost.value.retryable and time.monotonic() - t0 < 30
        assert _wait_for(lambda: read_info(folder / "state") is None, 60), "site still up"
        left = str(folder / "state")
        assert _wait_for(lambda: not _processes_mentioning(left), 60), [
            Path(f"/proc/{pid}/cmdline").read_bytes()[:300] for pid in _processes_mentioning(left)]
        assert isinstance(transport.submit(worker_pid).result(timeout=180), int)
        again = read_info(folder / "state")
        assert again is not None and again["pid"] != info["pid"]
    finally:
        transport.close()
        stop_site(str(folder), all=True)
