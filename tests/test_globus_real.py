"""The remote path through both real ends of Globus Compute (``tests/plugins/globus_offline.py``):
``GlobusTransport``'s own ``globus_compute_sdk.Executor`` submits to the fake web service, a real
RabbitMQ broker carries tasks to the real ``globus-compute-endpoint`` daemon started from a site
rendered by ``fabric site check --write``, its user endpoint's GlobusComputeEngine runs the
fabric's endpoint functions, and results come back through the broker to the Executor.

The site's ``allowed_functions`` lists the fabric's registered functions (fabric.wire.functions'
one list), so everything here also proves that list is complete for what the SDK sends. More on
the same pair: ``tests/test_globus_transport.py`` (the transport's own behaviour, a site with
user functions off), ``tests/test_campaign_globus.py`` (a campaign's shards),
``tests/test_modes_sdk.py`` (embed, hidden states, logprobs, chat against the local site).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric.errors import AccessDenied, EndpointError, FabricError, FunctionNotAllowed
from fabric.wire import functions
from tests.plugins.globus_offline import OfflineGlobus, write_globus_site
from tests.plugins.site import LONG_TOKENS, TINY_MODEL, server_pid
from tests.plugins.throttle import throttle_process

pytestmark = [pytest.mark.slow, pytest.mark.globus]


def add(a: int, b: int = 0) -> int:
    """Not one of the fabric's functions: outside the endpoint's allowed_functions."""
    return a + b


@pytest.fixture(scope="module")
def fab(globus_offline: OfflineGlobus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``Fabric`` over the real pair; every deployment it made is undeployed at the end."""
    from fabric import Fabric

    t = globus_offline.transport(tmp_path_factory.mktemp("fabric-home"))
    with Fabric(site=str(globus_offline.site_dir), transport=t, on_status=None) as client:
        try:
            yield client
        finally:
            for dep in t.submit(functions.list_deployments, None, None).result(timeout=120):
                t.submit(functions.undeploy, dep["id"], None).result(timeout=120)


def report(globus_offline: OfflineGlobus, **values: float) -> None:
    """Record timings (printed at the end of the module; run with -s to see them)."""
    globus_offline.timings.update({k: round(v, 3) for k, v in values.items()})
    print(json.dumps(globus_offline.timings), file=sys.stderr)


def test_first_result_through_the_real_pair(globus_offline: OfflineGlobus,
                                            tmp_path: Path) -> None:
    """A cold user endpoint: the service's start command, the fork, the engine, one task."""
    t = globus_offline.transport(tmp_path)
    t0 = time.monotonic()
    models = t.submit(functions.list_models, None).result(timeout=300)
    report(globus_offline, first_result_s=time.monotonic() - t0)
    assert TINY_MODEL in {m["name"] for m in models}
    t.close()
    # The service heard only routes the fake implements (a contract check of the pins).
    assert globus_offline.service.unknown == []


def test_generate_stream_and_embed(fab: Any, globus_offline: OfflineGlobus) -> None:
    t0 = time.monotonic()
    done = fab.generate("The mitochondria is", model=TINY_MODEL, max_tokens=12)
    cold = time.monotonic() - t0
    t0 = time.monotonic()
    again = fab.generate("The mitochondria is", model=TINY_MODEL, max_tokens=12)
    warm = time.monotonic() - t0
    assert again.token_ids == done.token_ids and len(done.token_ids) == 12
    t0 = time.monotonic()
    with fab.stream("The mitochondria is", model=TINY_MODEL, max_tokens=12) as stream:
        first = next(iter(stream))
        ttft = time.monotonic() - t0
        chunks = [first, *stream]
    assert "".join(chunks) == done.text and stream.token_ids == done.token_ids
    vectors = fab.embed(["a cell", "a mitochondrion"], model=TINY_MODEL, layer=-1,
                        pooling="mean")
    assert len(vectors) == 2 and len(vectors[0]) > 0
    report(globus_offline, generate_cold_deploy_s=cold, generate_warm_s=warm,
           stream_first_token_s=ttft)


def test_user_function_next_to_the_model(fab: Any) -> None:
    ns: dict[str, Any] = {"__name__": "__main__"}  # pickled by value, as from a notebook
    exec("def ask(handle, prompt):\n"
         "    return handle.generate(prompt, max_tokens=4).token_ids\n", ns)
    ids = fab.submit(ns["ask"], "The mitochondria is", model=TINY_MODEL).result(timeout=300)
    assert len(ids) == 4


def test_policy_denials(globus_offline: OfflineGlobus, tmp_path: Path) -> None:
    """The site policy runs in the endpoint's worker: no proof, and a model the caller's
    identity is not allowed, are typed denials."""
    anonymous = globus_offline.transport(tmp_path / "a", proof=None)
    with pytest.raises(AccessDenied) as err:
        anonymous.submit(functions.deployment_status, TINY_MODEL, None, None,
                         None).result(timeout=120)
    assert err.value.details == {"rule": "identity-proof.missing"}
    anonymous.close()
    t = globus_offline.transport(tmp_path / "b")
    with pytest.raises(AccessDenied) as err:
        t.submit(functions.deployment_status, "smollm2-135m", None, None,
                 None).result(timeout=120)
    assert err.value.details["rule"] == "policy.default"
    t.close()


def test_allow_list_refusals(globus_offline: OfflineGlobus, tmp_path: Path) -> None:
    """A function outside allowed_functions: refused by the service at submission, and, when a
    task gets past it, by the real endpoint itself before any worker runs it."""
    t = globus_offline.transport(tmp_path)
    with pytest.raises(FunctionNotAllowed, match="not permitted") as err:
        t.submit(add, 1, 2).result(timeout=120)
    assert err.value.details["rule"] == "allowed_functions"
    globus_offline.service.enforce_allowed_functions = False
    try:
        with pytest.raises(FunctionNotAllowed, match="not permitted on endpoint") as err:
            t.submit(add, 1, 2).result(timeout=120)
        assert err.value.details["rule"] == "allowed_functions"
    finally:
        globus_offline.service.enforce_allowed_functions = True
        t.close()


def test_per_task_latency_and_batching(globus_offline: OfflineGlobus, tmp_path: Path) -> None:
    """Warm user endpoint: one task at a time (each its own submission), then 32 at once (the
    Executor batches what is queued into few submissions)."""
    t = globus_offline.transport(tmp_path)
    t.submit(functions.list_models, None).result(timeout=300)
    one = []
    for _ in range(6):
        t0 = time.monotonic()
        t.submit(functions.list_models, None).result(timeout=120)
        one.append(time.monotonic() - t0)
    before = len(globus_offline.service.submissions)
    t0 = time.monotonic()
    futures = [t.submit(functions.list_models, None) for _ in range(32)]
    assert all(TINY_MODEL in {m["name"] for m in f.result(timeout=120)} for f in futures)
    burst = time.monotonic() - t0
    submissions = len(globus_offline.service.submissions) - before
    assert submissions < 32
    report(globus_offline, task_latency_median_s=statistics.median(one),
           tasks_32_s=burst, tasks_32_submissions=submissions)
    t.close()


def test_task_group_results_recovered_by_a_new_client(globus_offline: OfflineGlobus,
                                                     tmp_path: Path) -> None:
    """A client that stops and a new one (same FABRIC_HOME) reloads the saved task group's
    results through the real Executor's ``reload_tasks`` (the service's task-group and batch
    status routes)."""
    t = globus_offline.transport(tmp_path)
    first = [t.submit(functions.list_models, None).result(timeout=120) for _ in range(2)]
    t.close()
    again = globus_offline.transport(tmp_path)
    try:
        futures = again.recover()
    finally:
        again.close()
    # The SDK shares one task group among every Executor of a process that was given none
    # (Executor._default_task_group_id), so this group also holds earlier tests' tasks: all
    # of them come back, failures as their typed errors.
    group = json.loads((tmp_path / "task_groups.json").read_text())[t.site]
    assert len(futures) == len(globus_offline.service.groups[group])
    values = []
    for f in futures:
        try:
            values.append(f.result(timeout=120))
        except FabricError:
            continue
    assert sum(v == first[0] for v in values) >= 2


@pytest.mark.parametrize(("status", "code", "error", "rule"), [
    (401, "UNAUTHORIZED", "AuthError", None),
    (403, "FORBIDDEN", "AccessDenied", "globus-compute"),
])
def test_service_http_errors_are_typed_and_the_next_call_works(
        globus_offline: OfflineGlobus, tmp_path: Path, status: int, code: str, error: str,
        rule: str | None) -> None:
    """The real Executor stops itself when a submission fails; the caller gets a typed error
    for that call and the transport's next call goes through a new Executor."""
    import fabric.errors

    t = globus_offline.transport(tmp_path)
    globus_offline.service.fail_submits.append((status, code))
    with pytest.raises(getattr(fabric.errors, error)) as err:
        t.submit(functions.list_models, None).result(timeout=120)
    assert f"HTTP {status}" in str(err.value)
    if rule:
        assert err.value.details["rule"] == rule
    assert TINY_MODEL in {m["name"] for m in
                          t.submit(functions.list_models, None).result(timeout=120)}
    t.close()


def test_one_429_is_retried_by_the_sdk(globus_offline: OfflineGlobus, tmp_path: Path) -> None:
    """globus_sdk's transport retries a 429 itself (with backoff): the call succeeds."""
    t = globus_offline.transport(tmp_path)
    globus_offline.service.fail_submits.append((429, "TOO_MANY_REQUESTS"))
    t0 = time.monotonic()
    assert TINY_MODEL in {m["name"] for m in
                          t.submit(functions.list_models, None).result(timeout=120)}
    assert not globus_offline.service.fail_submits  # the 429 was answered
    report(globus_offline, after_one_429_s=time.monotonic() - t0)
    t.close()


def test_the_fake_outlives_an_idle_broker_connection(globus_offline: OfflineGlobus) -> None:
    """A publishing connection left idle misses its heartbeats and the broker drops it (seen
    at a full run's session teardown): the fake publishes on a new one and stops cleanly."""
    from fabric.testing import compute_fake, rabbitmq

    fake = compute_fake.FakeComputeService(globus_offline.service.amqp_url + "?heartbeat=1",
                                           port=rabbitmq.free_port())
    fake.start()
    try:
        fake._declare("fabric.idle-probe")  # the publishing connection, then left idle
        time.sleep(6)  # a few missed 1 s heartbeats: the broker closes the idle connection
        fake._publish("fabric.idle-probe", b"still here")
    finally:
        fake.stop()
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(globus_offline.service.amqp_url))
    try:
        _, _, body = conn.channel().basic_get("fabric.idle-probe", auto_ack=True)
    finally:
        conn.close()
    assert body == b"still here"  # published, not lost into the dropped connection


def test_concurrent_streams_share_one_long_poll(fab: Any, globus_offline: OfflineGlobus) -> None:
    """8 streams and 2 plain requests at once from one client: the client's one long-poll
    (``poll_requests``, held at the site until there is news) serves them all, so the Globus
    tasks it costs are bounded by time (one per ``poll_interval_s`` at most) and each names
    several requests, not one per poll per stream; every stream gets exactly the tokens a
    plain request gets. The server is slowed meanwhile: left free, the tiny model can finish
    every request while the site holds its admission for its first events (all of it then
    comes back with the admission, no poll is needed, and the path under test is not taken:
    it happened once in a clean run)."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Stream {i}: the mitochondria is" for i in range(10)]
    want = {p: fab.generate(p, model=TINY_MODEL, max_tokens=32) for p in prompts}
    ids = globus_offline.function_ids

    def tasks_of(*names: str) -> int:
        wanted = {ids[n] for n in names}
        return sum(1 for task in list(globus_offline.service.tasks.values())
                   if task.function_id in wanted)

    def polls() -> int:
        return tasks_of("poll_requests")

    def stream(p: str) -> tuple[float, list[int], float]:
        t0 = time.monotonic()
        with fab.stream(p, model=TINY_MODEL, max_tokens=32) as s:
            first = next(iter(s))
            ttft = time.monotonic() - t0
            text = first + "".join(s)
        assert text == want[p].text
        return ttft, s.token_ids, time.monotonic() - t0

    pid = server_pid(fab)
    before, admissions_before = polls(), tasks_of("open_stream", "open_streams")
    polled_before = fab._path.poller().tasks_submitted
    named_before = fab._path.poller().requests_named
    t0 = time.monotonic()
    with throttle_process(pid), ThreadPoolExecutor(10) as pool:
        streams = [pool.submit(stream, p) for p in prompts[:8]]
        plain = [pool.submit(fab.generate, p, model=TINY_MODEL, max_tokens=32)
                 for p in prompts[8:]]
        got = [f.result(timeout=300) for f in streams]
        done = [f.result(timeout=300) for f in plain]
    elapsed = time.monotonic() - t0
    tasks = polls() - before
    # Opened together beyond the site's 2 request workers, the admissions that queued went
    # together (fabric.client.admission): a task per request would be 10.
    admissions = tasks_of("open_stream", "open_streams") - admissions_before
    assert 2 <= admissions <= 8 and tasks_of("open_streams") >= 1, admissions
    for (_, ids, _), p in zip(got, prompts[:8], strict=True):
        assert ids == want[p].token_ids
    assert [r.token_ids for r in done] == [want[p].token_ids for p in prompts[8:]]
    interval = fab.transport.poll_interval_s
    assert 1 <= tasks <= elapsed / interval + 2, (tasks, elapsed)
    # A poll per request would name one request each; the shared poll names the open ones
    # together. (Not a bound on the count: the slowed server makes how long the 10 run,
    # and so how many polls they take, vary from run to run.)
    poller = fab._path.poller()
    named = poller.requests_named - named_before
    assert named / (poller.tasks_submitted - polled_before) >= 2, (named, tasks)
    report(globus_offline, streams8_elapsed_s=elapsed, streams8_poll_tasks=tasks,
           streams8_ttft_median_s=statistics.median(g[0] for g in got),
           streams8_requests_per_poll=round(named / (poller.tasks_submitted - polled_before), 2))


def test_a_site_that_dies_mid_stream_fails_the_stream_typed(
        globus_offline: OfflineGlobus, tiny_llama_dir: Path, long_prompt: str,
        tmp_path: Path) -> None:
    """A site's endpoint dies (every process of it killed at once) while a stream is read
    through Globus Compute. The service keeps accepting the client's poll tasks and nothing
    answers them: the stream must end with a retryable ``EndpointError`` once the site has
    been silent for a poll's hold plus ``poll_lost_after_s``, not wait for ever. Its own
    endpoint (on the same broker and fake), since it is killed."""
    from fabric import Fabric

    site = write_globus_site(tmp_path / "site", tiny_llama_dir, globus_offline.function_ids,
                             name="gc-dies")
    with globus_offline.endpoint(site, tmp_path / "gc", "gc-dies") as doomed:
        assert doomed.daemon is not None
        t = doomed.transport(tmp_path / "home")
        t.poll_lost_after_s = 5.0
        with Fabric(site=str(doomed.site_dir), transport=t, on_status=None) as fab:
            pid = server_pid(fab)
            with throttle_process(pid):  # still generating when its site dies
                stream = fab.stream(long_prompt, model=TINY_MODEL, max_tokens=LONG_TOKENS)
                first = next(iter(stream))
                killed = doomed.daemon.kill()
                t0 = time.monotonic()
                with pytest.raises(EndpointError, match="answered no poll") as lost:
                    for _ in stream:
                        pass
                waited = time.monotonic() - t0
    assert killed and isinstance(first, str)
    assert lost.value.retryable
    hold = 10.0  # fabric.client.poller.WAIT_S
    assert waited < hold + 5.0 + 30, waited
    report(globus_offline, site_lost_after_s=waited)


def _beat_every_5s(ep_dir: Path) -> None:
    """The endpoint manager's heartbeat every 5 s (its least), not 30: the fake then reports
    it offline 12.5 s after its last one."""
    with (ep_dir / "config.yaml").open("a") as fh:
        fh.write("\nheartbeat_period: 5\n")


def test_a_call_to_a_site_whose_endpoint_died_fails_typed_before_admission(
        globus_offline: OfflineGlobus, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A site's endpoint dies before a call is admitted. Its admission task is accepted by
    the service and nothing runs it, and no request is open for the long-poll to notice.
    The call must end with a retryable ``EndpointError`` once Globus Compute reports the
    endpoint offline (its heartbeats stopped), with no ``on_status`` and no ``timeout``,
    not wait for ever; while the endpoint beats, it is reported online."""
    from fabric import Fabric

    site = write_globus_site(tmp_path / "site", tiny_llama_dir, globus_offline.function_ids,
                             name="gc-gone")
    with globus_offline.endpoint(site, tmp_path / "gc", "gc-gone", edit=_beat_every_5s) as gone:
        assert gone.daemon is not None
        t = gone.transport(tmp_path / "home")
        t.offline_check_s = 2.0
        deadline = time.monotonic() + 20  # its first heartbeat follows its registration
        while t.endpoint_status() != "online" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert t.endpoint_status() == "online"
        gone.daemon.kill()
        with Fabric(site=str(gone.site_dir), transport=t, on_status=None) as fab:
            t0 = time.monotonic()
            with pytest.raises(EndpointError, match="reports its endpoint offline") as lost:
                fab.generate("The mitochondria is", model=TINY_MODEL, max_tokens=4)
            waited = time.monotonic() - t0
        assert t.endpoint_status() == "offline"
    assert lost.value.retryable
    assert waited < 12.5 + 2 * 2.0 + 10, waited  # offline, two checks, slack
    report(globus_offline, offline_call_failed_after_s=waited)


def _daemon_pool(marker: str) -> tuple[int, int] | None:
    """A worker pool of the daemon run ``marker`` and its multiprocessing helper, once both
    are up (the helper listens on its socket a moment after the pool starts)."""
    from fabric.endpoint.poolwatch import helper_of
    from fabric.procs import proc_cmdline
    from fabric.testing.gc_endpoint import marked

    for pid in marked(marker):
        if "process_worker_pool" in proc_cmdline(pid) and (helper := helper_of(pid)):
            return pid, helper
    return None


def test_a_daemon_run_pool_that_lost_its_helper_is_replaced(
        globus_offline: OfflineGlobus, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Under the real daemon, the user endpoint's worker pool loses its ``multiprocessing``
    helper (``kill -9``). Parsl alone never notices (the pool still heartbeats) and every task
    it takes is never answered; the guard the template's ``worker_init`` starts
    (``fabric.endpoint.poolguard``) kills the pool, Parsl starts a new block, and the next
    call succeeds, or fails as a retryable ``WorkerPoolLost`` within the heartbeat threshold
    (20 s) and the one after it succeeds. Its own endpoint, since its pool is killed."""
    import os
    import signal

    from fabric.testing.gc_endpoint import marked
    from tests.plugins.site import wait_until

    site = write_globus_site(tmp_path / "site", tiny_llama_dir, globus_offline.function_ids,
                             name="gc-pool")
    with globus_offline.endpoint(site, tmp_path / "gc", "gc-pool") as ep:
        assert ep.daemon is not None
        t = ep.transport(tmp_path / "home")
        try:
            t.submit(functions.list_models, None).result(timeout=180)  # a warm user endpoint
            pool, helper = wait_until(lambda: _daemon_pool(ep.daemon.marker), 30,
                                      "the user endpoint's worker pool and its helper")
            os.kill(helper, signal.SIGKILL)
            t0 = time.monotonic()
            try:
                first = t.submit(functions.list_models, None).result(timeout=40)
            except EndpointError as exc:  # the call reached the pool before the guard's kill
                assert exc.retryable and exc.details.get("code") == "WorkerPoolLost", exc
                first = None
            waited = time.monotonic() - t0
            models = t.submit(functions.list_models, None).result(timeout=60)
            replaced = _daemon_pool(ep.daemon.marker)
        finally:
            t.close()
    assert waited < 30, waited
    assert first is None or TINY_MODEL in {m["name"] for m in first}
    assert TINY_MODEL in {m["name"] for m in models}
    assert replaced is not None and replaced[0] != pool
    assert not marked(ep.daemon.marker), "the daemon's processes outlived its stop"
    report(globus_offline, pool_lost_call_s=waited, pool_lost_call_failed=first is None)
