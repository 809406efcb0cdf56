"""The model server's front door: one ROUTER socket, in its own thread.

It answers health, admission and cancel at once (even while the loop is mid-step), so an
overloaded server says ``Overloaded`` in milliseconds instead of hanging. Events from the
loop arrive over an inproc socket; they are pushed to streaming clients and buffered for
long-poll clients. A client that has vanished cannot be routed to (``ROUTER_MANDATORY``): its
request is cancelled, so nothing leaks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from fabric import tickets
from fabric.engine.embed_batches import Batch, split_member
from fabric.engine.engine import Engine
from fabric.engine.prepare import Preparer, member_id
from fabric.engine.scheduler import internal_error
from fabric.engine.sequence import Sequence
from fabric.engine.usage_ledger import UsageLedger
from fabric.errors import FabricError, InvalidRequest, Overloaded, ServerInternalError
from fabric.protocol import (
    QUEUE_FULL,
    CancelMessage,
    DrainMessage,
    InferenceRequest,
    PollMessage,
    StatsMessage,
    SubmitMessage,
    UsageMessage,
    pack,
    parse_message,
    request_digest,
    unpack,
    validate_request,
)
from fabric.sites import ServerConfig

log = logging.getLogger("fabric.frontend")
OUTBOX = "inproc://fabric-outbox"


@dataclass
class Record:
    """What the front door remembers about one request."""

    identity: bytes
    stream: bool
    detach: bool
    events: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None
    last_seen: float = field(default_factory=time.monotonic)
    waiters: list[tuple[bytes, int, float, bool]] = field(default_factory=list)
    """Long polls waiting: identity, cursor, deadline, and whether only the end wakes it."""


class Frontend:
    """Serves the wire protocol for one engine."""

    def __init__(self, engine: Engine, preparer: Preparer, config: ServerConfig,
                 ticket_key: bytes, model_name: str, health_extra: dict[str, Any]) -> None:
        self.engine, self.preparer, self.config = engine, preparer, config
        self.key, self.model_name, self.health_extra = ticket_key, model_name, health_extra
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.records: dict[str, Record] = {}
        self.batches: dict[str, Batch] = {}
        self.state = "loading"
        self.draining = False
        self.started = time.monotonic()
        self.used = tickets.UsedTickets()
        self.usage = UsageLedger()
        """Tokens delivered on accounted (stream) tickets, until the site collects them."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def bind(self, host: str, secret_key: bytes, public_key: bytes) -> int:
        """Bind the ROUTER (CURVE server) on a free port; returns the port."""
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.curve_server = True
        self.sock.curve_secretkey = secret_key
        self.sock.curve_publickey = public_key
        self.sock.router_mandatory = True
        self.sock.linger = 0
        self.sock.maxmsgsize = self.config.max_message_bytes
        port = self.sock.bind_to_random_port(f"tcp://{host}")
        self.outbox = self.ctx.socket(zmq.PULL)
        self.outbox.bind(OUTBOX)
        return port

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self._serve, name="frontend", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the sockets."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def emitter(self) -> Any:
        """A callable for the engine thread that forwards (request_id, message) here."""
        push = self.ctx.socket(zmq.PUSH)
        push.connect(OUTBOX)

        def emit(request_id: str, message: dict[str, Any]) -> None:
            message["request_id"] = request_id
            push.send(pack(message))

        return emit

    # --- the loop ----------------------------------------------------------------------------

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.outbox, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(100))
            if self.outbox in ready:
                while self.outbox.poll(0):
                    self._guarded(self._on_event, unpack(self.outbox.recv()))
            if self.sock in ready:
                while self.sock.poll(0):
                    self._on_frames(self.sock.recv_multipart())
            self._guarded(self._housekeeping)
        self.sock.close(0)
        self.outbox.close(0)

    def _guarded(self, fn: Any, *args: Any) -> None:
        """Run one unit of front-door work; log what it raises instead of dying with it."""
        try:
            fn(*args)
        except Exception:
            log.exception("front door: %s failed; serving on", getattr(fn, "__name__", fn))

    def _send(self, identity: bytes, message: dict[str, Any]) -> bool:
        try:
            frame = pack(message)
        except Exception:  # e.g. text that cannot be UTF-8: say so rather than nothing
            log.exception("front door: a %s reply could not be encoded", message.get("op"))
            frame = pack({"op": "error", "request_id": None, "error": ServerInternalError(
                "model server could not encode its reply").to_dict()})
        try:
            self.sock.send_multipart([identity, frame], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def _on_frames(self, frames: list[bytes]) -> None:
        """One incoming message, whatever it holds: a reply (typed error at worst) and never
        an exception out of here, so no peer can stop the front door."""
        identity, rid = frames[0], None
        try:
            if len(frames) != 2:
                raise InvalidRequest(f"a message is exactly one frame (one msgpack map); got "
                                     f"{len(frames) - 1}")
            msg = unpack(frames[1])
            rid = _request_id_of(msg)
            self._on_message(identity, msg)
        except FabricError as exc:
            self._send(identity, {"op": "error", "request_id": rid, "error": exc.to_dict()})
        except Exception as exc:
            log.exception("front door: unexpected failure on a message (request %s)", rid)
            err = internal_error(str(rid), exc) if rid else ServerInternalError(
                f"model server failed on this message ({type(exc).__name__})",
                error=type(exc).__name__)
            self._send(identity, {"op": "error", "request_id": rid, "error": err.to_dict()})

    def _on_message(self, identity: bytes, msg: dict[str, Any]) -> None:
        """Check in order: the op is known; its ticket is genuine (before anything else of
        the message is read, so an unauthenticated peer learns nothing and costs one HMAC);
        the message fits its op's schema; the ticket covers it; then serve it."""
        op = msg.get("op")
        claims: dict[str, Any] = {}
        if op in ("submit", "poll", "cancel", "drain", "stats", "usage"):
            claims = tickets.authenticate(self.key, msg.get("ticket"), model=self.model_name)
        parsed = parse_message(msg)
        if isinstance(parsed, SubmitMessage):
            self._submit(identity, parsed, claims)
        elif isinstance(parsed, PollMessage):
            tickets.check(claims, request_id=parsed.request_id)
            self._poll(identity, parsed)
        elif isinstance(parsed, CancelMessage):
            tickets.check(claims, request_id=parsed.request_id)
            self._cancel(identity, parsed.request_id)
        elif isinstance(parsed, DrainMessage):
            tickets.check(claims, request_id=tickets.ANY_REQUEST, admin=True)
            self._drain(identity)
        elif isinstance(parsed, StatsMessage):
            tickets.check(claims, request_id=tickets.ANY_REQUEST, admin=True)
            self._send(identity, {"op": "stats", **self.stats()})
        elif isinstance(parsed, UsageMessage):
            tickets.check(claims, request_id=tickets.ANY_REQUEST, admin=True)
            self._send(identity, {"op": "usage", "entries": self.usage.take()})
        else:
            self._send(identity, {"op": "health", **self.health()})

    def _submit(self, identity: bytes, msg: SubmitMessage, claims: dict[str, Any]) -> None:
        request = validate_request(msg.request)
        rid = request.request_id
        tickets.check(claims, request_id=rid)
        tickets.check_request(claims, kind=request.kind, max_tokens=request.sampling.max_tokens,
                              digest=request_digest(request))
        self.used.check(claims)
        self.usage.check_room(claims)
        if self.draining or self.state != "ready":
            state = "draining" if self.draining else self.state
            raise Overloaded(f"model server is {state}; retry shortly", retry_after=1.0,
                             reason=state)
        if rid in self.records or self._member_of(rid) is not None:
            raise InvalidRequest(f"request id {rid} is already in use on this server")
        if request.prompts is not None:
            self._submit_batch(identity, msg, request, claims)
            return
        seq = self._prepare(request, msg.stream or msg.detach)
        assert isinstance(seq, Sequence)
        tickets.check_tokens(claims, seq.reserve)
        self._admit(len(seq.prompt_ids))
        self.used.spend(claims)
        self.records[rid] = Record(identity, msg.stream, msg.detach)
        self.usage.start(rid, claims, len(seq.prompt_ids))
        self._send(identity, {"op": "accepted", "request_id": rid})
        self.engine.post("add", seq)

    def _prepare(self, request: InferenceRequest, stream: bool) -> Sequence | list[Sequence]:
        """Tokenise and check a request (one text, or a batch); the tokenizer or chat template
        failing on it is the request's problem: ``InvalidRequest``, not a server error. A
        refusal here (``ContextLengthExceeded``, ``InvalidHook``...) counts in the stats: the
        site's ``fabric_request_failure_total``, by error class (the client may have sent the
        request straight here, and the site then never sees it)."""
        try:
            if request.prompts is not None:
                return self.preparer.prepare_batch(request)
            return self.preparer.prepare(request, stream=stream)
        except FabricError as exc:
            self.engine.stats.refused(type(exc).__name__)
            raise
        except Exception as exc:
            self.engine.stats.refused(InvalidRequest.__name__)
            raise InvalidRequest(f"the model's tokenizer cannot take this request: "
                                 f"{type(exc).__name__}: {exc}") from None

    def _submit_batch(self, identity: bytes, msg: SubmitMessage, request: InferenceRequest,
                      claims: dict[str, Any]) -> None:
        """Admit a batch whole, as one arrival carrying all its prompt tokens (see
        ``_admit``); its texts then wait and run as separate sequences."""
        seqs = self._prepare(request, False)
        assert isinstance(seqs, list)
        tickets.check_tokens(claims, sum(s.reserve for s in seqs))
        tokens = sum(len(s.prompt_ids) for s in seqs)
        if tokens > self.config.max_queue_tokens:
            raise InvalidRequest(
                f"batch of {len(seqs)} texts has {tokens} prompt tokens; this server queues at "
                f"most {self.config.max_queue_tokens}: send fewer texts per batch",
                prompt_tokens=tokens, max_queue_tokens=self.config.max_queue_tokens)
        self._admit(tokens)
        self.used.spend(claims)
        rid = request.request_id
        self.records[rid] = Record(identity, msg.stream, msg.detach)
        self.batches[rid] = Batch(rid, len(seqs))
        self.usage.start(rid, claims, tokens)
        self._send(identity, {"op": "accepted", "request_id": rid})
        self.engine.post_all("add", seqs)  # a step never starts with part of the batch

    def _member_of(self, rid: str) -> tuple[Batch, int] | None:
        """The batch (and index in it) whose member sequence ``rid`` is, if any."""
        parts = split_member(rid)
        batch = None if parts is None else self.batches.get(parts[0])
        return None if batch is None or parts is None else (batch, parts[1])

    def _admit(self, tokens: int) -> None:
        """Refuse with ``Overloaded`` unless one more arrival with ``tokens`` prompt tokens
        fits the queue limits. A batch is one arrival here (it is admitted exactly when a single
        request with its total prompt tokens would be); once admitted, each of its texts waits
        as a sequence of its own and counts as one request for later arrivals."""
        cfg = self.config
        waiting, waiting_tokens, free, backlog = self.engine.queued()
        # A request that finds a free place in the running batch starts at the next step: only
        # the ones beyond the free places really queue (so max_queue_requests=0 admits exactly
        # the requests that can start now, and their time to first token stays short).
        beyond = max(0, waiting + 1 - free)
        limit = cfg.max_prefill_tokens
        if beyond > cfg.max_queue_requests or waiting_tokens + tokens > cfg.max_queue_tokens:
            why = (f"model server queue is full ({waiting} requests, {waiting_tokens} prompt "
                   f"tokens waiting; limits {cfg.max_queue_requests} and "
                   f"{cfg.max_queue_tokens})")
        elif limit is not None and backlog + tokens > limit and backlog > 0:
            # backlog > 0: a lone prompt longer than the limit is still served when idle
            why = (f"model server prefill backlog is full ({backlog} prompt tokens not yet "
                   f"prefilled; limit {limit})")
        else:
            return
        raise Overloaded(why, retry_after=retry_after(backlog, self.engine.prefill_tokens_per_s),
                         queued=waiting, reason=QUEUE_FULL)

    def _poll(self, identity: bytes, msg: PollMessage) -> None:
        rid = msg.request_id
        rec = self.records.get(rid)
        if rec is None:
            raise InvalidRequest(f"no request {rid} on this server (finished more than "
                                 f"{self.config.stream_buffer_s} s ago, or never submitted)")
        rec.last_seen = time.monotonic()
        cursor = msg.cursor
        wait = min(msg.wait, 60.0)
        news = rec.final is not None or (cursor < len(rec.events) and not msg.final)
        if news or wait <= 0:
            self._answer_poll(identity, rid, rec, cursor)
        else:
            rec.waiters.append((identity, cursor, time.monotonic() + wait, msg.final))

    def _answer_poll(self, identity: bytes, rid: str, rec: Record, cursor: int) -> None:
        final = rec.final or {}
        self._send(identity, {
            "op": "events", "request_id": rid, "events": rec.events[cursor:],
            "cursor": len(rec.events), "done": rec.final is not None,
            "result": final.get("result"), "error": final.get("error")})

    def _cancel(self, identity: bytes, rid: str) -> None:
        rec = self.records.get(rid)
        was = "unknown" if rec is None else ("done" if rec.final is not None else "running")
        if rec is not None and rec.final is None:
            ids = self._engine_ids(rid)
            was = "queued" if self._all_waiting(ids) else "running"
            self.engine.post_all("cancel", ids)
        self._send(identity, {"op": "cancelled", "request_id": rid, "was": was})

    def _engine_ids(self, rid: str) -> list[str]:
        """The engine's sequences of request ``rid``: its own, or its batch's unfinished ones."""
        batch = self.batches.get(rid)
        return [rid] if batch is None else [member_id(rid, i) for i in sorted(batch.pending)]

    def _all_waiting(self, ids: list[str]) -> bool:
        wanted = set(ids)
        with self.engine.lock:
            waiting = {p.request_id for k, p in self.engine.inbox if k == "add"}
            waiting.update(s.request_id for s in list(self.engine.scheduler.waiting))
        return wanted <= waiting

    def health(self) -> dict[str, Any]:
        """Server state and load figures."""
        sched = self.engine.scheduler
        waiting = self.engine.queued().waiting
        return {
            "state": "draining" if self.draining else self.state,
            "queue_depth": waiting, "running": len(sched.running),
            "kv_used_tokens": sched.kv_used, "kv_budget_tokens": sched.limits.kv_budget_tokens,
            "tokens_per_s": round(self.engine.tokens_per_s, 2),
            "tokens_total": self.engine.tokens_total,
            "idle_s": round(time.monotonic() - self.engine.last_active, 2),
            "uptime_s": round(time.monotonic() - self.started, 2), "pid": os.getpid(),
            **self.health_extra,
        }

    def stats(self) -> dict[str, Any]:
        """The engine's cumulative statistics and the load now (``stats`` op)."""
        sched = self.engine.scheduler
        return {**self.engine.stats.snapshot(),
                "state": "draining" if self.draining else self.state,
                "num_requests_running": len(sched.running),
                "num_requests_waiting": self.engine.queued().waiting,
                "kv_used_tokens": sched.kv_used,
                "kv_budget_tokens": sched.limits.kv_budget_tokens,
                "uptime_s": round(time.monotonic() - self.started, 3)}

    def _drain(self, identity: bytes) -> None:
        self.draining = True
        self.engine.wake.set()
        self._send(identity, {"op": "draining"})

    # --- events from the engine --------------------------------------------------------------

    def _on_event(self, msg: dict[str, Any]) -> None:
        rid = str(msg["request_id"])
        member = self._member_of(rid)
        if member is not None:
            self._on_member(*member, msg)
            return
        final = msg["op"] in ("done", "error")
        if final:
            self.usage.finish(rid, msg)  # counted even if its client is gone
        else:
            self.usage.add(rid, len(msg.get("token_ids") or []))
        rec = self.records.get(rid)
        if rec is None:
            return
        if final:
            rec.final = msg
        else:
            rec.events.append(msg)
        waiting = []
        for waiter in rec.waiters:
            if waiter[3] and not final:  # it waits for the end only
                waiting.append(waiter)
            else:
                self._answer_poll(waiter[0], rid, rec, waiter[1])
        rec.waiters[:] = waiting
        if rec.detach or (not rec.stream and not final):
            return
        if not self._send(rec.identity, msg) and not final:
            # The streaming client is gone: stop generating for it.
            self.engine.post("cancel", rid)
        if final:
            self.records.pop(rid, None)

    def _on_member(self, batch: Batch, index: int, msg: dict[str, Any]) -> None:
        """A batch member's final event: fold it in; the batch's own "done" goes out when
        every member is in, its "error" at the first member that fails."""
        if msg["op"] == "done":
            batch.add(index, msg["result"])
            if not batch.done:
                return
            final = {"op": "done", "request_id": batch.request_id, "result": batch.result()}
        elif msg["op"] == "error":
            batch.pending.discard(index)
            self.engine.post_all("cancel", self._engine_ids(batch.request_id))
            final = {"op": "error", "request_id": batch.request_id, "error": msg["error"]}
        else:
            return
        self.batches.pop(batch.request_id, None)
        self._on_event(final)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        horizon = self.config.stream_buffer_s
        for rid, rec in list(self.records.items()):
            for waiter in list(rec.waiters):
                if now >= waiter[2]:
                    rec.waiters.remove(waiter)
                    self._answer_poll(waiter[0], rid, rec, waiter[1])
            if rec.detach and now - rec.last_seen > horizon:
                if rec.final is None:
                    # nobody is polling any more
                    self.engine.post_all("cancel", self._engine_ids(rid))
                    self.batches.pop(rid, None)
                self.usage.finish(rid)  # what it delivered before it was abandoned
                self.records.pop(rid, None)


def _request_id_of(msg: dict[str, Any]) -> str | None:
    """The request id a reply about ``msg`` should carry (so the client can route it), if
    the message names one as a string."""
    rid = msg.get("request_id")
    request = msg.get("request")
    if rid is None and isinstance(request, dict):
        rid = request.get("request_id")
    return rid if isinstance(rid, str) and len(rid) <= 300 and rid.isprintable() else None


def retry_after(backlog: int, prefill_rate: float) -> float:
    """Seconds after which a refused arrival may find room: how long the server takes to
    prefill (or embed) the prompt tokens ahead of it at its recent rate, within 0.5-30 s.
    Without a recent rate (just started, or only decoding) it says 1 s: a refusal is cheap."""
    if prefill_rate <= 0:
        return 1.0
    return round(min(30.0, max(0.5, backlog / prefill_rate)), 2)
