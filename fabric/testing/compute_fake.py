"""A local fake of the Globus Compute web service (and the Globus Auth routes it needs).

Only the cloud is fake. Both ends are the real pinned code: ``globus_compute_sdk.Executor`` on the
client, ``globus-compute-endpoint start`` at the site, and the messages between them travel
through a real RabbitMQ broker (``fabric.testing.rabbitmq``)::

    Executor --HTTP--> FakeComputeService --AMQP cmd.<endpoint>--> core endpoint (forks a user
        ^                 |  publishes each task to tasks.<user endpoint>    endpoint per identity
        |                 |                                   + user config)
        |                 +<--AMQP results exchange-- user endpoint (engine runs the task)
        +--AMQP task-group queue <-- the fake forwards each Result

It is a contract test of the pinned versions (globus-compute-sdk/endpoint 4.19): the routes,
the command message, the user endpoint's AMQP credentials are private formats that can change
between releases. The SDK and the endpoint fix ``http://localhost:5000`` for
``local_compute_services``, so the fake listens on 127.0.0.1:5000. Not reproduced: the
service's own authorisation (a bearer ``fake-as-<identity id>`` submits as that identity, any
other bearer or none as ``IDENTITY``), its rate limits and payload limits, endpoint restarts
and task expiry. As the service does, it starts one user endpoint per submitting identity (and
user config), naming that identity and its identity set in the start command. Two more Auth
routes serve the fabric itself: token introspection and identity lookup for the site policy
(``fabric.endpoint.policy``, ``fabric.endpoint.asserted``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

PORT = 5000
"""Fixed by the SDK's environment table for ``local_compute_services``."""
IDENTITY = "5c6f9a3e-0000-4000-8000-00000000f00d"
"""The one Globus identity every token belongs to (the endpoint trusts it: ``userinfo``)."""
USERNAME = "tester@example.org"
OTHER_IDENTITY = "7d1e2b4c-0000-4000-8000-00000000beef"
"""A second Globus identity (a submitter the tests' site policy does not list)."""
OTHER_USERNAME = "stranger@elsewhere.org"
IDENTITY_PROVIDER = "41143743-f3c8-4d60-bbdb-eeecaba85bd9"
BEARER_PREFIX = "fake-as-"
"""A bearer ``fake-as-<identity id>`` submits as that identity; no bearer is ``IDENTITY``."""


def bearer_for(identity_id: str) -> str:
    """The access token the fake attributes to ``identity_id`` (a client's authorizer)."""
    return BEARER_PREFIX + identity_id
RESULTS_EXCHANGE = "fake.results"
HEARTBEAT_EXCHANGE = "fake.heartbeats"
TASK_GROUP_PREFIX = "tg."
OFFLINE_AFTER_PERIODS = 2.5
"""Heartbeat periods without one after which the fake reports an endpoint offline."""


@dataclass
class _Task:
    task_id: str
    function_id: str
    group: str
    endpoint_id: str
    status: str = "waiting-for-ep"
    result: bytes | None = None
    created: float = field(default_factory=time.time)


class FakeComputeService:
    """The web service's state and its AMQP side; ``serve()`` runs the HTTP side on :5000."""

    def __init__(self, amqp_url: str, *, port: int = PORT) -> None:
        self.amqp_url = amqp_url
        self.port = port
        self.functions: dict[str, str] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.user_endpoints: dict[tuple[str, str, str], str] = {}
        self.tasks: dict[str, _Task] = {}
        self.groups: dict[str, list[str]] = {}
        self.submissions: list[dict[str, Any]] = []
        """Every POST .../submit body (tests check batching, user_endpoint_config)."""
        self.calls: list[tuple[str, str]] = []
        """(method, path) of every request, in order."""
        self.unknown: list[tuple[str, str]] = []
        """Requests no route matched (a newer SDK or endpoint calling something new)."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._http: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._pub: Any = None
        self._local = threading.local()
        self.identities: dict[str, str] = {IDENTITY: USERNAME, OTHER_IDENTITY: OTHER_USERNAME}
        """Globus identities the fake's Auth knows: id -> username."""
        self.start_commands: list[dict[str, Any]] = []
        """Every ``cmd_start_endpoint`` sent to an endpoint (tests check the identity)."""
        self.fail_submits: list[tuple[int, str]] = []
        """``(HTTP status, code)`` answers for the next submissions, in order (tests of how
        the client maps the service's 401/403/429)."""
        self.heartbeats: dict[str, tuple[float, float]] = {}
        """endpoint id -> (when its last heartbeat came, its ``heartbeat_period``; 0: it said
        it is shutting down), from the ``EPStatusReport`` each endpoint publishes."""
        self.enforce_allowed_functions = True
        """Refuse a function outside an endpoint's ``allowed_functions`` at submission, as
        the service does; off, the task reaches the endpoint, which refuses it itself."""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeComputeService:
        """Declare the exchanges, start the result forwarder and the HTTP server."""

        channel = self._channel()
        for exchange in (RESULTS_EXCHANGE, HEARTBEAT_EXCHANGE):
            channel.exchange_declare(exchange, exchange_type="direct")
            channel.queue_declare(exchange)
            channel.queue_bind(exchange, exchange, routing_key=exchange)
        self._http = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self._http.daemon_threads = True
        for target, name in ((self._http.serve_forever, "fake-compute-http"),
                             (self._forward_results, "fake-compute-results")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop serving; close the broker connections."""
        self._stop.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        for thread in self._threads:
            thread.join(timeout=10)
        with self._lock:
            if self._pub is not None:
                # An idle blocking connection misses its heartbeats and the broker drops it:
                # closing it then raises, and there is nothing left to close.
                with contextlib.suppress(Exception):
                    self._pub.connection.close()
                self._pub = None

    # -- the AMQP side ------------------------------------------------------------------------

    def _channel(self) -> Any:
        """The publishing channel, opened again if the broker dropped it (a blocking
        connection left idle between tests misses its heartbeats). An open-looking channel is
        probed first: a dropped connection is noticed only when pika reads from it, and a
        publish into it would be lost without an error."""
        import pika

        if self._pub is not None:
            try:
                self._pub.connection.process_data_events(0)  # heartbeats; notices a drop
            except Exception:
                self._pub = None
        if self._pub is None or not self._pub.is_open or not self._pub.connection.is_open:
            self._pub = pika.BlockingConnection(pika.URLParameters(self.amqp_url)).channel()
            self._pub.confirm_delivery()  # a publish the broker did not take raises
        return self._pub

    def _on_channel(self, use: Callable[[Any], Any]) -> None:
        """``use(channel)``, once more on a new connection if the broker had dropped it."""
        import pika

        with self._lock:
            try:
                use(self._channel())
            except pika.exceptions.AMQPConnectionError:
                self._pub = None
                use(self._channel())

    def _publish(self, routing_key: str, body: bytes, **props: Any) -> None:
        import pika

        self._on_channel(lambda ch: ch.basic_publish("", routing_key, body,
                                                     pika.BasicProperties(**props)))

    def _declare(self, *queues: str) -> None:
        def declare(ch: Any) -> None:
            for name in queues:
                ch.queue_declare(name)

        self._on_channel(declare)

    def _forward_results(self) -> None:
        """Consume what user endpoints publish; forward each Result to its task group."""
        import pika
        from globus_compute_common import messagepack

        conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        chan = conn.channel()

        def on_result(ch: Any, method: Any, props: Any, body: bytes) -> None:
            try:
                msg = messagepack.unpack(body)
            except Exception:
                log.exception("unreadable result message")
                return
            task = self.tasks.get(str(getattr(msg, "task_id", "")))
            if task is None or task.result is not None:
                return  # a status report, an unknown task, or a result delivered again
            task.result, task.status = body, "success"
            ch.basic_publish("", TASK_GROUP_PREFIX + task.group, body)

        chan.basic_consume(RESULTS_EXCHANGE, on_result, auto_ack=True)
        chan.basic_consume(HEARTBEAT_EXCHANGE, self._on_heartbeat, auto_ack=True)
        while not self._stop.is_set():
            conn.process_data_events(time_limit=0.2)
        conn.close()

    def _on_heartbeat(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        from globus_compute_common import messagepack

        try:
            report = messagepack.unpack(body)
            period = float((getattr(report, "global_state", None) or {})
                           .get("heartbeat_period", 30.0))
            self.heartbeats[str(getattr(report, "endpoint_id", ""))] = (time.monotonic(), period)
        except Exception:
            log.exception("unreadable heartbeat")

    def endpoint_status(self, endpoint_id: str) -> dict[str, Any] | None:
        """What ``GET /v2/endpoints/{id}/status`` answers: ``online`` while the endpoint's
        heartbeats come, ``offline`` once ``OFFLINE_AFTER_PERIODS`` of its periods passed
        without one, after it said it is shutting down, or before its first. How long the real
        service waits is not documented: this is the fake's choice."""
        if endpoint_id not in self.endpoints:
            return None
        when, period = self.heartbeats.get(endpoint_id, (0.0, 0.0))
        alive = period > 0 and time.monotonic() - when <= OFFLINE_AFTER_PERIODS * period
        return {"status": "online" if alive else "offline", "details": {}}

    def _queue_info(self, exchange: str) -> dict[str, Any]:
        return {"connection_url": self.amqp_url, "exchange": exchange, "queue": exchange,
                "queue_publish_kwargs": {"exchange": exchange, "routing_key": exchange,
                                         "mandatory": True,
                                         "properties": {"delivery_mode": 2}}}

    def identity_record(self, identity_id: str) -> dict[str, Any]:
        """An identity as Globus Auth describes it (the fields a mapping may match on)."""
        username = self.identities[identity_id]
        return {"id": identity_id, "sub": identity_id, "username": username,
                "name": username.split("@")[0], "email": username, "status": "used",
                "organization": username.split("@")[-1],
                "identity_provider": IDENTITY_PROVIDER,
                "identity_provider_display_name": "Example Identities"}

    def _user_endpoint(self, endpoint_id: str, config: dict[str, Any],
                       runtime: dict[str, Any], identity: str = IDENTITY) -> str:
        """The user endpoint for (endpoint, submitter, user config), with a start command: as
        the service does, each identity gets its own."""
        key = (endpoint_id, identity, json.dumps(config, sort_keys=True))
        # A start command goes out with every submission, as the service sends them: the
        # endpoint ignores it while that user endpoint runs, and starts it again after it shut
        # itself down when idle (its queue would otherwise fill with tasks nobody reads).
        with self._lock:
            uep = self.user_endpoints.get(key) or str(uuid.uuid4())
        self._declare(f"tasks.{uep}")
        creds = {"endpoint_id": uep,
                 "task_queue_info": {"connection_url": self.amqp_url, "queue": f"tasks.{uep}"},
                 "result_queue_info": self._queue_info(RESULTS_EXCHANGE),
                 "heartbeat_queue_info": self._queue_info(HEARTBEAT_EXCHANGE)}
        record = self.identity_record(identity)
        command = {"command": "cmd_start_endpoint", "globus_effective_identity": identity,
                   "globus_identity_set": [record],
                   "globus_username": record["username"], "args": [],
                   "kwargs": {"name": f"uep.{endpoint_id[:8]}.{uep[:8]}", "amqp_creds": creds,
                              "user_opts": config, "user_runtime": runtime}}
        self.start_commands.append(command)
        # The endpoint ignores commands whose timestamp is over 180 s off its clock.
        self._publish(f"cmd.{endpoint_id}", json.dumps(command).encode(),
                      content_type="application/json", timestamp=int(time.time()))
        # Known only once its start command is out: a submit that failed before would
        # otherwise leave later tasks queued for a user endpoint nothing ever started.
        with self._lock:
            uep = self.user_endpoints.setdefault(key, uep)
        return uep

    # -- routes ---------------------------------------------------------------------------------

    def register_endpoint(self, body: dict[str, Any], endpoint_id: str | None = None
                          ) -> dict[str, Any]:
        ep = endpoint_id or body.get("endpoint_id") or str(uuid.uuid4())
        self.endpoints[ep] = body
        self._declare(f"cmd.{ep}")
        return {"endpoint_id": ep,
                "command_queue_info": {"connection_url": self.amqp_url, "queue": f"cmd.{ep}"},
                "heartbeat_queue_info": self._queue_info(HEARTBEAT_EXCHANGE)}

    def submit(self, body: dict[str, Any], endpoint_id: str) -> tuple[int, dict[str, Any]]:
        from globus_compute_common import messagepack
        from globus_compute_common.messagepack.message_types import Task

        if self.fail_submits:
            status, code = self.fail_submits.pop(0)
            return status, {"code": code, "message": f"fake answers {status} {code}"}
        if endpoint_id not in self.endpoints:
            return 404, {"code": "ENDPOINT_NOT_FOUND", "message": f"no endpoint {endpoint_id}"}
        allowed = self.endpoints[endpoint_id].get("allowed_functions")
        refused = [f for f in body.get("tasks", {}) if allowed is not None and f not in allowed
                   and self.enforce_allowed_functions]
        if refused:  # as the service does, before anything reaches the endpoint
            return 403, {"code": "FUNCTION_NOT_ALLOWED",
                         "message": f"Function {refused[0]} not permitted on endpoint "
                                    f"{endpoint_id}"}
        unknown = [f for f in body.get("tasks", {}) if f not in self.functions]
        if unknown:
            return 404, {"code": "FUNCTION_NOT_FOUND", "message": f"no function {unknown[0]}"}
        self.submissions.append(body)
        group = body.get("task_group_id") or str(uuid.uuid4())
        if body.get("create_queue", True):
            self._declare(TASK_GROUP_PREFIX + group)
        uep = self._user_endpoint(endpoint_id, body.get("user_endpoint_config") or {},
                                  body.get("user_runtime") or {}, self.submitter())
        out: dict[str, list[str]] = {}
        spec = json.dumps(body.get("resource_specification") or None)
        for function_id, payloads in body.get("tasks", {}).items():
            for payload in payloads:
                tid = str(uuid.uuid4())
                self.tasks[tid] = _Task(tid, function_id, group, endpoint_id)
                self.groups.setdefault(group, []).append(tid)
                out.setdefault(function_id, []).append(tid)
                packed = messagepack.pack(Task(task_id=uuid.UUID(tid),
                                               task_buffer=self.functions[function_id] + payload))
                self._publish(f"tasks.{uep}", packed, headers={
                    "function_uuid": function_id, "task_uuid": tid,
                    "resource_specification": spec,
                    "result_serializers": body.get("result_serializers") or []})
        return 200, {"request_id": str(uuid.uuid4()), "task_group_id": group,
                     "endpoint_id": endpoint_id, "tasks": out}

    def submitter(self) -> str:
        """The identity of this request's bearer token (``bearer_for``); none is ``IDENTITY``
        (a client with a null authorizer)."""
        bearer = getattr(self._local, "bearer", "")
        if bearer.startswith(BEARER_PREFIX) and bearer[len(BEARER_PREFIX):] in self.identities:
            return bearer[len(BEARER_PREFIX):]
        return IDENTITY

    def task_record(self, task_id: str) -> dict[str, Any] | None:
        """What ``GET /v2/tasks/{id}`` answers: status, and the packed result's payload."""
        from globus_compute_common import messagepack
        from globus_compute_common.messagepack.message_types import Result

        task = self.tasks.get(task_id)
        if task is None:
            return None
        rec: dict[str, Any] = {"task_id": task_id, "status": task.status,
                               "task_group_id": task.group, "completion_t": None}
        if task.result is not None:
            result = messagepack.unpack(task.result)
            assert isinstance(result, Result)  # only Results are stored (_forward_results)
            rec["completion_t"] = str(time.time())
            if result.is_error:
                rec["status"], rec["exception"] = "failed", result.data
            else:
                rec["result"] = result.data
        return rec

    def route(self, method: str, path: str, body: dict[str, Any], basic_user: str = "",
              bearer: str = "") -> tuple[int, dict[str, Any]]:
        """Answer one request: ``(status, JSON body)``; ``basic_user`` is the client id of an
        HTTP Basic ``Authorization`` (a confidential client calling Auth), ``bearer`` the
        token of a Bearer one (who submits)."""
        from urllib.parse import parse_qsl

        self.calls.append((method, path))
        self._local.basic_user = basic_user  # per request thread
        self._local.bearer = bearer
        path, _, query = path.partition("?")
        path = path.rstrip("/")
        if method == "GET" and query and not body:
            body = dict(parse_qsl(query))
        for pattern, want, handler in self._routes():
            match = re.fullmatch(pattern, path)
            if match and method == want:
                return handler(body, *match.groups())
        self.unknown.append((method, path))
        return 404, {"code": "NOT_FOUND", "message": f"fake has no {method} {path}"}

    def _routes(self) -> list[tuple[str, str, Callable[..., tuple[int, dict[str, Any]]]]]:
        from globus_compute_endpoint.version import __version__ as ep_version
        from globus_compute_sdk.version import __version__ as sdk_version

        def ok(fn: Callable[..., dict[str, Any] | None]) -> Callable[..., tuple[int, Any]]:
            def wrapped(*args: Any) -> tuple[int, Any]:
                value = fn(*args)
                return (404, {"code": "NOT_FOUND"}) if value is None else (200, value)
            return wrapped

        def new_function(body: dict[str, Any]) -> dict[str, Any]:
            fid = str(uuid.uuid4())
            self.functions[fid] = body["function_code"]
            return {"function_uuid": fid}

        def token(body: dict[str, Any]) -> dict[str, Any]:
            # Exactly one token per resource server among the scopes asked for: Compute's
            # (funcx_service) and Auth's own (openid, profile, ...: auth.globus.org).
            scopes = str(body.get("scope", "")).split()
            compute = [s for s in scopes if "facd7ccc" in s]
            auth = [s for s in scopes if "facd7ccc" not in s]
            tokens = [{"access_token": f"fake-{rs}-{uuid.uuid4().hex}", "expires_in": 172800,
                       "resource_server": rs, "scope": " ".join(sorted(set(got))),
                       "token_type": "Bearer"}
                      for rs, got in (("funcx_service", compute), ("auth.globus.org", auth))
                      if got]
            return {**tokens[0], "other_tokens": tokens[1:]} if tokens else {}

        def introspect(body: dict[str, Any]) -> dict[str, Any]:
            # The fabric's site policy (not Globus Compute) introspects a caller's token with
            # the endpoint's confidential client: tokens this fake issued are active, for that
            # client's fabric scope.
            client = getattr(self._local, "basic_user", "")
            token = str(body.get("token", ""))
            if not token.startswith("fake-"):
                return {"active": False}
            who = token[len(BEARER_PREFIX):] if token.startswith(BEARER_PREFIX) else IDENTITY
            if who not in self.identities:
                return {"active": False}
            name = self.identities[who]
            return {"active": True, "sub": who, "username": name, "aud": [client],
                    "scope": f"https://auth.globus.org/scopes/{client}/fabric",
                    "exp": int(time.time()) + 3600, "identity_set": [who],
                    "identity_set_detail": [{"sub": who, "username": name}]}

        return [
            (r"/v2/oauth2/token/introspect", "POST", ok(introspect)),
            # Auth's identity lookup (the fabric's asserted-identity policy resolves the id
            # Globus Compute asserted to a username with the endpoint's client).
            (r"/v2/api/identities", "GET", ok(lambda b: {"identities": [
                self.identity_record(i) for i in str(b.get("ids", "")).split(",")
                if i in self.identities]})),
            (r"/v2/version", "GET", ok(lambda b: {
                "api": "1.0", "min_sdk_version": "1.0.0", "min_ep_version": "1.0.0",
                "sdk": sdk_version, "endpoint": ep_version})),
            (r"/v2/oauth2/token", "POST", ok(token)),
            (r"/v2/oauth2/userinfo", "GET", ok(lambda b: {
                "sub": IDENTITY, "preferred_username": USERNAME,
                "identity_set": [{"sub": IDENTITY, "username": USERNAME}]})),
            (r"/v3/endpoints", "POST", ok(self.register_endpoint)),
            (r"/v3/endpoints/([^/]+)", "PUT", ok(lambda b, e: self.register_endpoint(b, e))),
            (r"/v3/functions", "POST", ok(new_function)),
            (r"/v2/endpoints/([^/]+)/status", "GET", ok(lambda b, e: self.endpoint_status(e))),
            (r"/v3/endpoints/([^/]+)/submit", "POST", self.submit),
            (r"/v2/get_amqp_result_connection_url", "GET", ok(lambda b: {
                "connection_url": self.amqp_url, "queue_prefix": TASK_GROUP_PREFIX})),
            (r"/v2/tasks/([^/]+)", "GET", ok(lambda b, t: self.task_record(t))),
            (r"/v2/batch_status", "POST", ok(lambda b: {"results": {
                t: self.task_record(t) for t in b.get("task_ids", []) if t in self.tasks}})),
            (r"/v2/taskgroup/([^/]+)", "GET", ok(lambda b, g: None if g not in self.groups else {
                "taskgroup_id": g, "tasks": [{"id": t} for t in self.groups[g]]})),
        ]


def _handler(service: FakeComputeService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self, method: str) -> None:
            import base64
            from urllib.parse import parse_qsl

            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw.strip().startswith(b"{") else \
                    dict(parse_qsl(raw.decode()))
            except ValueError:
                body = {}
            scheme, _, cred = (self.headers.get("Authorization") or "").partition(" ")
            user = ""
            if scheme.lower() == "basic":
                user = base64.b64decode(cred).decode(errors="replace").partition(":")[0]
            bearer = cred if scheme.lower() == "bearer" else ""
            try:
                status, answer = service.route(method, self.path, body, user, bearer)
            except Exception as exc:  # a bug in the fake: say so to the caller
                log.exception("fake compute: %s %s", method, self.path)
                status, answer = 500, {"code": "FAKE_ERROR", "message": repr(exc)}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("fake compute: " + format, *args)

    return Handler
