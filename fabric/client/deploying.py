"""``Deployments``: the part of ``Fabric`` that manages models rather than using them.

The catalog (``models``), launching and pre-warming servers (``deploy``, ``wait_ready``),
listing and stopping them (``deployments``, ``undeploy``). A federation answers for each of
its healthy sites. ``Fabric`` inherits these; they need only its transport, auth, federation
and status reporting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fabric.client.checks import check_int, check_name
from fabric.client.status import StatusCallback, describe_status

if TYPE_CHECKING:
    from fabric.client.fabric import Fabric
    from fabric.client.federation import Federation
    from fabric.client.transport import Transport

__all__ = ["Deployments"]


class Deployments:
    """Model and deployment management calls (mixed into ``Fabric``)."""

    auth: Any
    federation: Federation | None

    @property
    def transport(self) -> Transport:
        """The site's transport (``Fabric`` opens it on first use)."""
        raise NotImplementedError

    @property
    def on_status(self) -> StatusCallback | None:
        """Called with the deployment's state while a call waits (``Fabric``'s)."""
        raise NotImplementedError

    @property
    def status_interval_s(self) -> float:
        """Seconds between status queries (``Fabric``'s)."""
        raise NotImplementedError

    def models(self) -> list[dict[str, Any]]:
        """The site's catalog: name, version, family, size, plan and deployment state (for a
        federation: every healthy site's rows, each naming its ``site``)."""
        if self.federation is not None:
            return self._each_healthy_site(lambda member: member.models())
        from fabric.wire.functions import list_models

        return list(self.transport.submit(list_models, self.auth).result())

    def deploy(self, model: str, *, pp: int | None = None, tp: int | None = None,
               version: str | None = None, wait: bool = True,
               timeout: float | None = None, ep: int | None = None) -> dict[str, Any]:
        """Launch (pre-warm) a deployment of ``model``; ``pp``/``tp``/``ep`` override the
        site's default plan (``ep``: expert-parallel groups per stage, mixtures of experts).
        With ``wait`` it returns once the server is ready (status goes to ``on_status``
        meanwhile), else as soon as the job is submitted."""
        check_name(model, "model")
        plan: dict[str, int] = {}
        for name, value in (("pp", pp), ("tp", tp), ("ep", ep)):
            if value is not None:
                plan[name] = check_int(value, name, minimum=1)
        from fabric.wire.functions import deploy

        record = dict(self.transport.submit(
            deploy, model, plan or None, self.auth, version).result())
        if not wait:
            return record
        return self.wait_ready(model, version=version, plan=plan or None, timeout=timeout,
                               first=record)

    def wait_ready(self, model: str, *, version: str | None = None,
                   plan: dict[str, int] | None = None, timeout: float | None = None,
                   first: dict[str, Any] | None = None) -> dict[str, Any]:
        """Poll the deployment of ``model`` until it is ready; raise ``DeploymentError`` if it
        dies, ``DeadlineExceeded`` after ``timeout`` seconds."""
        from fabric.errors import DeadlineExceeded, DeploymentError
        from fabric.wire.functions import deployment_status

        deadline = None if timeout is None else time.monotonic() + timeout
        status = first or {}
        # Follow the deployment ``deploy`` launched: once dead it is no longer the model's
        # live one, and the model's state alone would read "absent" for ever.
        launched = status.get("id")
        while True:
            state = status.get("state")
            if state == "ready":
                return status
            if state == "dead":
                raise DeploymentError(
                    f"deployment of {model} died: {status.get('message') or 'see site logs'}",
                    status=status,
                )
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"deployment of {model} not ready after {timeout} s "
                    f"({describe_status(status)})",
                    status=status,
                )
            if status and self.on_status is not None:
                self.on_status(status)
            if status:
                time.sleep(self.status_interval_s)
            status = dict(self.transport.submit(
                deployment_status, model, version, plan, self.auth, launched).result())

    def deployments(self) -> list[dict[str, Any]]:
        """The site's deployments: id, model, plan, job id, state, address, idle time (for a
        federation: every healthy site's, each with its ``site``)."""
        if self.federation is not None:
            return self._each_healthy_site(lambda member: [
                {**row, "site": member.transport.site} for row in member.deployments()])
        from fabric.wire.functions import list_deployments

        return list(self.transport.submit(list_deployments, self.auth).result())

    def undeploy(self, deployment_id: str) -> dict[str, Any]:
        """Drain and stop one deployment (running requests finish first)."""
        check_name(deployment_id, "deployment id")
        from fabric.wire.functions import undeploy

        return dict(self.transport.submit(undeploy, deployment_id, self.auth).result())

    def _each_healthy_site(self, fn: Callable[[Fabric], list[dict[str, Any]]]
                           ) -> list[dict[str, Any]]:
        assert self.federation is not None
        rows: list[dict[str, Any]] = []
        for state in self.federation.states.snapshot():
            if state.healthy:
                rows.extend(fn(self.federation.member(state.site)))
        return rows
