"""How the SDK reaches a site: the ``Transport`` protocol.

A transport runs one of the fabric's endpoint functions at a site, inside a request worker of
that site's Globus Compute engine, and hands back a ``concurrent.futures.Future``. The local
site and a remote Globus Compute endpoint differ only here.

``open_transport(site)`` is the one place that chooses: the SDK, the campaign runner and the
CLI all open sites through it. It imports the Globus SDKs only for a remote site, so users of
embedded sites never load them (``tests/test_layering.py`` holds the client to that).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fabric.errors import EndpointError


@runtime_checkable
class Transport(Protocol):
    """Runs endpoint functions at one site."""

    site: str
    """Name of the site this transport reaches."""

    can_reach_servers: bool
    """True when the client can open ZMQ connections to the site's model servers directly
    (the local site, a tunnel); otherwise streaming falls back to long-poll."""

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` in a request worker at the site."""
        ...

    def close(self) -> None:
        """Release sockets and threads."""
        ...


def submit_or_fail(transport: Transport, fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """``transport.submit(fn, *args)``, with a refusal to submit (a closed client, a full
    Executor) as that future's exception: callers settle one way whatever went wrong. Any
    error counts: raised in the admission or poller thread, it would end that thread and
    leave every call queued behind it waiting for ever."""
    try:
        return transport.submit(fn, *args)
    except Exception as exc:
        failed: Future[Any] = Future()
        failed.set_exception(exc)
        return failed


def settle(fut: Future[Any], value: Any = None, exc: BaseException | None = None) -> None:
    """Settle ``fut`` with ``value`` (or ``exc``) unless its caller cancelled it meanwhile:
    nobody wants the outcome then, and setting a cancelled future would raise in the thread
    that delivers answers (and leave the others it delivers unanswered)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
    except InvalidStateError:  # cancelled
        pass


def chain(inner: Future[Any], outer: Future[Any]) -> None:
    """Settle ``outer`` as ``inner`` settles (``settle``: not if ``outer`` was cancelled)."""
    def done(f: Future[Any]) -> None:
        try:
            value = f.result()
        except BaseException as exc:
            settle(outer, exc=exc)
            return
        settle(outer, value)

    inner.add_done_callback(done)


def open_transport(site: str, state_dir: str | Path | None = None) -> Transport:
    """The transport for ``site`` (a name or definition path).

    A site definition without a Globus Compute endpoint id (the local site, a Slurm cluster on
    this machine) runs embedded (``LocalTransport``, ``state_dir`` overriding the site's); one
    with an id goes through Globus Compute (``GlobusTransport``). A remote site's definition
    whose ``endpoint_id`` is not filled in is refused: running it embedded would submit
    PBS/Slurm jobs from this machine.
    """
    from fabric.sites import load_site

    config = load_site(site)
    if not config.endpoint_id and "endpoint_id" in config.template:
        raise EndpointError(
            f"site {config.name!r} is reached through Globus Compute but its endpoint_id is "
            f"not set; put `endpoint_id: <uuid>` in endpoints/{config.name}/values.yaml "
            "(the site operator prints it with `globus-compute-endpoint start`)",
            site=config.name)
    if not config.endpoint_id:
        from fabric.client.local import LocalTransport

        return LocalTransport(site=site, state_dir=state_dir)
    # The one import of fabric.globus in the client: only a remote site loads the Globus SDKs.
    from fabric.globus.transport import GlobusTransport

    return GlobusTransport(config)
