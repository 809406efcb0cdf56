"""The SDK: ``Fabric`` is what a scientist or a workflow holds.

Every call's arguments are checked first (``fabric.client.checks``: a typo costs no round trip
to a site and gets a typed ``InvalidRequest`` naming the argument), then it runs one of the
fabric's endpoint functions at the site through a ``Transport``: ``LocalTransport`` for the
embedded local site, ``GlobusTransport`` for a site behind a Globus Compute endpoint. The
transport is opened on first use, so building a ``Fabric`` never starts or contacts anything.

While a call waits on a model server that is still queued or loading (a cold start can take
minutes on a real site), the SDK asks the site for the deployment's state every few seconds and
hands it to ``on_status`` (the CLI shows it as a spinner) instead of sitting silent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Literal, Self

from fabric.client.callscope import start
from fabric.client.checks import (
    build_request,
    check_int,
    check_ints,
    check_messages,
    check_name,
    check_prompt,
    sampling,
)
from fabric.client.decoding import (
    decode_tensors,
    parse_generation,
    provenance_of,
)
from fabric.client.deploying import Deployments
from fabric.client.direct import DirectResults
from fabric.client.embedding import EmbedPlan
from fabric.client.federation import Federation, choose_sites, served_by
from fabric.client.handoff import RequestPath
from fabric.client.routing import RoutingConfig
from fabric.client.status import StatusCallback, StatusPrinter, describe_status
from fabric.client.streaming import DirectSource, EventSource, PollSource, Stream
from fabric.client.transport import Transport, open_transport
from fabric.errors import FabricError, InvalidRequest
from fabric.protocol import GenerationResult, Hook, InferenceRequest

__all__ = ["DEFAULT_EMBED_MODEL", "DEFAULT_MODEL", "Fabric", "StatusCallback", "StatusPrinter",
           "describe_status"]

DEFAULT_MODEL = "smollm2-135m"
"""Model used when a text call names none."""
DEFAULT_EMBED_MODEL = "minilm-l6"
"""Model used by ``embed`` when none is named."""

log = logging.getLogger("fabric.client")


class Fabric(Deployments):
    """A connection to one site of the inference fabric.

    >>> fab = Fabric()                          # the local site, started on first use
    >>> fab.generate("The mitochondria is", max_tokens=24).text
    >>> for chunk in fab.stream("Tell me a story"): print(chunk, end="")
    >>> fab.embed(["a", "b"]).shape             # (2, 384)
    >>> fab.submit(lambda handle, x: handle.generate(x).text, "Hi", model="smollm2-135m")
    """

    def __init__(self, site: str | None = None, transport: Transport | None = None,
                 auth: Any = None, *, on_status: StatusCallback | Literal["print"] | None = "print",
                 status_interval_s: float = 2.0, sites: Sequence[str] | None = None,
                 routing: RoutingConfig | dict[str, Any] | None = None,
                 handoff: bool = True) -> None:
        """``site``: a site name (``endpoints/<site>``) or definition path; ``transport``
        overrides how it is reached; ``auth``: credentials passed to the endpoint (``None``:
        the transport's own login); ``on_status``: called with the deployment's state while a
        call waits on a cold model server ("print": a line on stderr per change; ``None``: no
        status polling at all); ``handoff``: a request worker admits a request and hands it
        off instead of waiting out its generation (``request_future``).

        ``sites``: sites to route among (a federation, ``fabric.client.federation``; a list
        of one too: it does not start a stopped site unless ``routing`` allows it):
        each call goes to the best site hosting its model and fails over before any output;
        ``routing`` tunes it (``RoutingConfig``). With neither ``site`` nor ``sites`` nor a
        ``transport``, the user's config file (``$FABRIC_HOME/config.yaml``) may name the
        sites; else the site is ``local``."""
        site, sites, config = choose_sites(site, sites, transport is not None, routing)
        site = "local" if site is None else site
        if not isinstance(site, str) or not site:
            raise InvalidRequest(f"site must be a non-empty string, got {site!r}")
        self.site = site
        self.auth = auth
        self._transport = transport
        self._borrowed = False  # a with_auth twin's transport is its owner's to close
        self._lock = threading.Lock()
        self._path = RequestPath(lambda: self.transport, auth,
                                 StatusPrinter() if on_status == "print" else on_status,
                                 status_interval_s, handoff)
        self._autostart = True  # a federation's member: its routing config says
        self.federation: Federation | None = None
        """The member sites and their routing, when built with ``sites`` (even a list of one:
        it routes, and does not start a site, as any federation)."""
        if sites:
            self.federation = Federation(
                sites, lambda ref: self._member(ref, config.autostart), config, auth)
            self.site = self.federation.names[0]

    @property
    def on_status(self) -> StatusCallback | None:
        """Called with the deployment's state while a call waits on a cold server."""
        return self._path.on_status

    @on_status.setter
    def on_status(self, callback: StatusCallback | None) -> None:
        self._path.on_status = callback

    @property
    def status_interval_s(self) -> float:
        """Seconds between status queries while a call waits on a cold server."""
        return self._path.status_interval_s

    @status_interval_s.setter
    def status_interval_s(self, seconds: float) -> None:
        self._path.status_interval_s = seconds

    @property
    def handoff(self) -> bool:
        """Whether request workers hand requests off (``False``: a worker serves it whole)."""
        return self._path.handoff

    def _member(self, site: str, autostart: bool) -> Fabric:
        member = Fabric(site, auth=self.auth, on_status=self.on_status,
                        status_interval_s=self.status_interval_s, handoff=self.handoff)
        member._autostart = autostart
        return member

    @property
    def sites(self) -> list[str]:
        """The sites this client routes among (one for a single-site client)."""
        return list(self.federation.names) if self.federation is not None else [self.site]

    def at(self, site: str) -> Fabric:
        """The single-site client of member ``site`` of a federation (deploy, undeploy and
        catalog calls aimed at one site); ``self`` for a single-site client of that site."""
        if self.federation is None:
            if site != self.site:
                raise InvalidRequest(f"this client reaches only site {self.site!r}",
                                     param="site")
            return self
        if site not in self.federation.names:
            raise InvalidRequest(f"no site {site!r} in the federation "
                                 f"({', '.join(self.federation.names)})", param="site")
        return self.federation.member(site)

    def with_auth(self, auth: Any) -> Self:
        """A client for the same site(s) sending ``auth``, sharing this one's transports,
        direct connections and admission queue (and a federation's site states and
        counters); quiet (``on_status=None``). A gateway holds one per caller: they cost no
        thread of their own, except a long-poll's at a site it cannot reach."""
        twin = type(self)(self.site, transport=self.transport, auth=auth, on_status=None,
                          handoff=self.handoff)
        twin._borrowed = True
        if self.federation is None:
            twin._path.share(self._path)
            return twin
        fed = self.federation

        def member(name: str) -> Fabric:
            fed.transport(name)  # opened as the federation opens it (autostart off)
            return fed.member(name).with_auth(auth)

        twin.federation = fed.with_auth(auth, member)
        twin.site = fed.names[0]
        return twin

    # -- transport ---------------------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        """The site's transport, opened on first use (this may start the local site); for a
        federation, the first site's."""
        if self.federation is not None:
            return self.federation.transport(self.federation.names[0])
        with self._lock:
            if self._transport is None:
                transport = open_transport(self.site)
                if not self._autostart and hasattr(transport, "autostart"):
                    transport.autostart = False  # before saying it starts the site
                self._transport = transport
                self._report_site_start(transport)
            return self._transport

    def _report_site_start(self, transport: Transport) -> None:
        # Starting the embedded site takes seconds on first use; say so rather than hang.
        state_dir = getattr(transport, "state_dir", None)
        if self.on_status is None or state_dir is None or not getattr(transport, "autostart",
                                                                      False):
            return
        from fabric.client.local import read_info

        if read_info(state_dir) is None:
            self.on_status({"model": f"site {transport.site}", "state": "starting-site"})

    def close(self) -> None:
        """Release the transport's sockets and threads (the site itself keeps running); a
        ``with_auth`` twin releases only its own (its owner's stay open)."""
        with self._lock:
            transport, self._transport = self._transport, None
            federation = self.federation
        if federation is not None:
            federation.close()
        self._path.close()
        if transport is not None and not self._borrowed:
            transport.close()

    def __enter__(self) -> Fabric:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- text ---------------------------------------------------------------------------------

    def generate(self, prompt: str, *, model: str = DEFAULT_MODEL, version: str | None = None,
                 max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] = (),
                 logprobs: bool = False, top_logprobs: int = 0,
                 timeout: float | None = None,
                 hooks: HookSpecs = None) -> GenerationResult:
        """Complete ``prompt``; returns text, token ids, finish reason, model identity, timings.

        Defaults are greedy decoding of up to 64 tokens. ``stop`` strings end the output before
        them; ``timeout`` (seconds) is a deadline the server enforces. ``hooks`` are
        declarative interventions for this request only (see docs/inference-modes.md).
        """
        request = build_request(
            "generate", model=model, version=version, prompt=check_prompt(prompt),
            sampling=sampling(max_tokens, temperature, top_p, top_k, seed, stop, logprobs,
                              top_logprobs),
            timeout=timeout, hooks=_hooks(hooks),
        )
        return self._generation(self._run(request))

    def chat(self, messages: Sequence[dict[str, str]], *, model: str = DEFAULT_MODEL,
             version: str | None = None, max_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop: str | Sequence[str] = (), logprobs: bool = False, top_logprobs: int = 0,
             timeout: float | None = None, hooks: HookSpecs = None) -> GenerationResult:
        """Answer a conversation (``[{"role": "user", "content": "..."}, ...]``) using the
        model's chat template; returns the assistant's reply as a ``GenerationResult``."""
        request = build_request(
            "generate", model=model, version=version, messages=check_messages(messages),
            sampling=sampling(max_tokens, temperature, top_p, top_k, seed, stop, logprobs,
                              top_logprobs),
            timeout=timeout, hooks=_hooks(hooks),
        )
        return self._generation(self._run(request))

    def stream(self, prompt: str | None = None, *, messages: Sequence[dict[str, str]] | None = None,
               model: str = DEFAULT_MODEL, version: str | None = None, max_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               seed: int | None = None, stop: str | Sequence[str] = (), logprobs: bool = False,
               top_logprobs: int = 0, timeout: float | None = None,
               hooks: HookSpecs = None) -> Stream:
        """Like ``generate`` (or ``chat`` with ``messages=``) but returns a ``Stream`` of text
        chunks as the server decodes them. Close it (or use ``with``) to stop early."""
        request = self.stream_request(
            prompt, messages=messages, model=model, version=version, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            logprobs=logprobs, top_logprobs=top_logprobs, timeout=timeout, hooks=hooks)
        if self.federation is not None:
            from fabric.client.federation import FailoverSource

            return Stream(FailoverSource(self.federation, request.model,
                                         lambda member: member._open_source(request, True)))
        return Stream(self._open_source(request))

    def stream_request(self, prompt: str | None = None, *,
                       messages: Sequence[dict[str, str]] | None = None,
                       model: str = DEFAULT_MODEL, version: str | None = None,
                       max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                       top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] = (),
                       logprobs: bool = False, top_logprobs: int = 0,
                       timeout: float | None = None,
                       hooks: HookSpecs = None) -> InferenceRequest:
        """The checked request ``stream`` sends for these arguments (a bad one raises
        ``InvalidRequest`` naming it); nothing is sent."""
        if (prompt is None) == (messages is None):
            raise InvalidRequest("give exactly one of prompt or messages")
        return build_request(
            "generate", model=model, version=version,
            prompt=None if prompt is None else check_prompt(prompt),
            messages=None if messages is None else check_messages(messages),
            sampling=sampling(max_tokens, temperature, top_p, top_k, seed, stop, logprobs,
                              top_logprobs),
            timeout=timeout, hooks=_hooks(hooks),
        )

    def direct_admission(self, request: InferenceRequest
                         ) -> tuple[Future[dict[str, Any]], DirectResults] | None:
        """Start admitting ``request`` as a direct stream without waiting: its admission's
        future and the connections its events will come through (``AsyncFabric`` reads them
        on its event loop). ``None`` where this client's streams are not direct (a
        federation, a site whose servers it cannot reach) or its transport is not open yet
        (opening it may start the site): then use ``stream``."""
        # Read without the lock: ``transport`` holds it while it opens the transport (it may
        # start the site, seconds), and this runs on an event loop that must not wait.
        transport = self._transport
        if self.federation is not None or transport is None or not transport.can_reach_servers:
            return None
        admitted = self._path.admit(request.model_dump(mode="json"), "direct")
        return admitted, self._path.direct()

    def admission(self, future: Future[dict[str, Any]], request: InferenceRequest
                  ) -> dict[str, Any]:
        """Wait for ``request``'s admission ``future``, telling ``on_status`` about a cold
        server meanwhile; the admission's info (its server, ticket)."""
        return dict(self._path.wait(future, request.model, request.version))

    def _open_source(self, request: InferenceRequest, impatient: bool = False) -> EventSource:
        """Open ``request`` as a stream at this (single) site: its event source.
        ``impatient``: a server silent for ``FAILOVER_SILENCE_S`` is asked at once whether
        it still answers (a federation moves a stream whose server died before its first
        token; it restores the usual patience once tokens come)."""
        transport = self.transport
        mode = "direct" if transport.can_reach_servers else "poll"
        # A polled stream's admission is held at the site until its first events, which come
        # back with it: its first token then costs one task round trip, not two.
        hold = STREAM_HOLD_S if mode == "poll" else 0.0
        info = self.admission(
            self._path.admit(request.model_dump(mode="json"), mode, hold, mode == "poll"),
            request)
        source: EventSource
        if mode == "direct":
            source = DirectSource(info, request, self._path.direct(), *(
                (FAILOVER_SILENCE_S, FAILOVER_PROBE_S) if impatient else ()))
        else:
            source = PollSource(transport, info, request.model, self.auth, self._path.poller())
        source.site = transport.site
        return source

    # -- representations ----------------------------------------------------------------------

    def embed(self, texts: str | Sequence[str], *, model: str = DEFAULT_EMBED_MODEL,
              version: str | None = None, layer: int | Sequence[int] = -1,
              pooling: str = "mean", normalize: bool = True, hooks: HookSpecs = None,
              return_provenance: bool = False) -> Any:
        """Embedding vectors as a float32 numpy array: shape ``(dim,)`` for one string,
        ``(len(texts), dim)`` for a list. ``pooling`` is mean/first/last over tokens of
        ``layer``; vectors are L2-normalised unless ``normalize=False``. With a list of layers
        the result is ``{layer: array}`` with one array per layer, keyed as asked. With
        ``return_provenance`` it is ``(vectors, Provenance)`` (``fabric.provenance``)."""
        plan = EmbedPlan.of(texts, layer)
        requests = [
            build_request("embed", model=model, version=version, prompts=prompts,
                          layers=plan.layers, pooling=pooling, normalize=normalize,
                          hooks=_hooks(hooks))
            for prompts in plan.chunk_texts()
        ]
        # One batched request per endpoint task; tasks run in parallel request workers and
        # all their texts are in flight at the server at once (it batches them).
        transport = self.transport
        from fabric.wire.functions import run_requests

        futures = [transport.submit(run_requests, [r.model_dump(mode="json")], self.auth)
                   for r in requests]
        results = []
        for n, (chunk, future) in enumerate(zip(plan.chunks, futures, strict=True)):
            try:
                results.extend(self._path.wait(future, model, version) if n == 0
                               else future.result())
            except FabricError as exc:
                raise plan.renumber(exc, chunk) from None
        value = plan.assemble(results)
        return (value, provenance_of(results[0])) if return_provenance else value

    def hidden_states(self, text: str, *, model: str = DEFAULT_MODEL, version: str | None = None,
                      layers: Sequence[int] = (-1,), positions: Sequence[int] | None = None,
                      hooks: HookSpecs = None) -> dict[str, Any]:
        """The residual stream after each of ``layers`` (negative counts from the end) at
        ``positions`` (default: every token), as torch tensors in the returned dict."""
        request = build_request(
            "hidden_states", model=model, version=version, prompt=check_prompt(text),
            layers=check_ints(layers, "layers"),
            positions=None if positions is None else check_ints(positions, "positions"),
            hooks=_hooks(hooks),
        )
        return dict(decode_tensors(self._run(request)))

    def logprobs(self, text: str, continuation: str | None = None, *,
                 model: str = DEFAULT_MODEL, version: str | None = None,
                 hooks: HookSpecs = None, top_logprobs: int = 0) -> dict[str, Any]:
        """Log-probability of each token of ``continuation`` given ``text``; without a
        continuation, of every token of ``text`` after the first (perplexity).
        ``top_logprobs=k``: also each position's k most likely tokens (``top_logprobs``)."""
        request = build_request(
            "logprobs", model=model, version=version, prompt=check_prompt(text),
            continuation=None if continuation is None
            else check_prompt(continuation, field="continuation"),
            hooks=_hooks(hooks),
            **({"sampling": {"logprobs": True, "top_logprobs": check_int(
                top_logprobs, "top_logprobs", minimum=0)}} if top_logprobs else {}),
        )
        return dict(decode_tensors(self._run(request)))

    # -- user functions -----------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any, model: str | None = DEFAULT_MODEL,
               **kwargs: Any) -> Future[Any]:
        """Run ``fn(handle, *args, **kwargs)`` at the site, next to a warm ``model``.

        ``handle`` has ``generate``, ``embed``, ``logprobs``... on that model. The future's
        ``result()`` is what ``fn`` returned; if ``fn`` raised, it raises ``UserFunctionError``
        whose ``details['traceback']`` is the remote traceback.
        """
        if not callable(fn):
            raise InvalidRequest(f"fn must be callable, got {type(fn).__name__}")
        if model is not None:
            check_name(model, "model")
        if self.federation is not None:
            # Fails over only if the function could not be handed to a site: once it runs it
            # may have had effects, so its future's errors are the caller's.
            future, _ = self.federation.call(model or "", lambda member: member.submit(
                fn, *args, model=model, **kwargs))
            return future
        from fabric.wire.functions import run_user_function
        from fabric.wire.usercode import ValueFuture, pack_call

        # The call travels as a string the site's workers never open (see wire.usercode).
        return ValueFuture(self.transport.submit(run_user_function, pack_call(fn, args, kwargs),
                                                 model, self.auth))

    # -- plumbing -----------------------------------------------------------------------------

    def _run(self, request: InferenceRequest) -> dict[str, Any]:
        if self.federation is not None:
            out, site = self.federation.call(request.model, lambda member: member._run(request))
            return served_by(out, site)
        # Watched by the caller's scope, if any (``AsyncFabric``: a cancelled task cancels it).
        future = start(lambda: self.request_future(request))
        return dict(self._path.wait(future, request.model, request.version))

    def request_future(self, request: InferenceRequest) -> Future[dict[str, Any]]:
        """Run one built request at this (single) site; its result's dict (or typed error) as
        a future. A request worker only admits it and hands it off (``RequestPath.future``).
        Cancelling the future cancels the request at the server."""
        return self._path.future(request)

    def _generation(self, out: dict[str, Any]) -> GenerationResult:
        result = parse_generation(out)
        if result.site is None:  # a single site's result: this site served it
            result.site = self.transport.site
        return result


STREAM_HOLD_S = 5.0
"""How long a site may hold a polled stream's admission for its first events."""
FAILOVER_SILENCE_S = 0.5
"""Before its first token, a federated stream's silence after which its server is asked for
its health ..."""
FAILOVER_PROBE_S = 1.5
"""... and how long that may take before the stream moves to the next site."""

HookSpecs = Sequence["Hook | dict[str, Any]"] | None
"""Declarative hooks: ``fabric.protocol.Hook`` objects or their dict form."""


def _hooks(hooks: HookSpecs) -> list[dict[str, Any]] | None:
    if hooks is None:
        return None
    if isinstance(hooks, dict | str) or not isinstance(hooks, Sequence):
        raise InvalidRequest("hooks must be a list of hook specs (dicts or fabric.protocol.Hook)")
    return [h.model_dump() if isinstance(h, Hook) else h for h in hooks]

