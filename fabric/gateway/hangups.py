"""A non-stream completion whose client hangs up stops its generation at the server.

A streamed completion notices a client that went away when its next chunk cannot be sent
(``fabric.gateway.streams``). A non-stream one sends nothing until its answer is whole, so its
route awaits the SDK's calls while it watches the connection: once the ASGI server says the
client disconnected (``http.disconnect``), the calls' task is cancelled (``AsyncFabric``
then cancels each request at the server) and the route answers 499, to nobody. A watch costs
a task per request, no thread and no round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request
from starlette.exceptions import HTTPException

__all__ = ["CLIENT_CLOSED", "unless_hung_up"]

T = TypeVar("T")

CLIENT_CLOSED = 499
"""The status of a request whose client went away first (nginx's "client closed request")."""


async def unless_hung_up(request: Request, work: Awaitable[T]) -> T:
    """``await work``, cancelled if the client hangs up first (then ``HTTPException`` 499).
    Call it once the body has been read: the next ASGI message is the disconnect."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((job, gone), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the gateway is going (its own shutdown)
        job.cancel()
        raise
    finally:
        gone.cancel()
    if job.done() or gone.exception() is not None:  # no disconnect seen: the answer goes
        return await job
    job.cancel()
    await asyncio.wait((job,))  # its requests' cancels are on their way
    if not job.cancelled():
        with contextlib.suppress(BaseException):
            job.result()  # it ended meanwhile; nobody takes its outcome
    raise HTTPException(CLIENT_CLOSED, "the client closed the connection before the answer")


async def _disconnected(request: Request) -> None:
    """Returns when the ASGI server reports the client gone."""
    message: dict[str, Any] = {}
    while message.get("type") != "http.disconnect":
        message = dict(await request.receive())
