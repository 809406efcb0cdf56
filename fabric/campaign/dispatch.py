"""The campaign runner: shards out pending inputs to sites and settles what comes back.

.. code:: text

    take runner.lock (one runner per campaign) -> recover: truncate outputs to the ledger's
    offsets, requeue inputs left running
    loop:  for each healthy site with a free slot (warm before starting before cold, then
           fewest in flight per weight; a site down or not answering its status is skipped):
               ledger.claim -> transport.submit(run_shard, shard, auth)
           wait for any shard future (or a timeout / cancel / stop)
           settle: append lines + fsync, then one ledger transaction (see ``ledger``)
    until nothing is pending or running -> (output_format: parquet: export) -> status done

Only this thread writes outputs and changes item states, so "check the input is still running
in this shard, write its line, commit" cannot race. A shard's late reply (after a timeout made
it retry elsewhere) finds its inputs no longer running in that shard and is dropped.

Over several sites each site's state comes from the federation's status call
(``fabric.client.sitestate``, cached ``ROUTING.status_ttl_s``): a site that dies mid-campaign
fails its shards' futures (the transport sees it go), their inputs go back to pending, and the
site is skipped until it answers again, so its shards move to the others. Such a campaign never
starts a member site that is down (its local transports do not autostart).
"""

from __future__ import annotations

import concurrent.futures as cf
import fcntl
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fabric.campaign import store
from fabric.campaign.ledger import Ledger
from fabric.campaign.manifest import Manifest, SiteSpec
from fabric.client.routing import TIERS, RoutingConfig, SiteState, rank_sites
from fabric.client.sitestate import SiteStates, probe
from fabric.errors import EndpointError, FabricError, InvalidRequest

log = logging.getLogger("fabric.campaign")

MAX_BACKOFF_S = 60.0
"""Longest pause for a site whose shards keep failing (others take its work meanwhile)."""
ROUTING = RoutingConfig(status_ttl_s=2.0, status_timeout_s=5.0, down_ttl_s=2.0)
"""How often a campaign over several sites asks each for its state."""


class SiteSlot:
    """A site's transport, in-flight shards and failure backoff."""

    def __init__(self, spec: SiteSpec, transport: Any) -> None:
        self.spec = spec
        self.transport = transport
        self.in_flight: dict[cf.Future[Any], tuple[str, float]] = {}
        self.failures = 0
        self.paused_until = 0.0
        self.tier = 0
        """Index in ``TIERS`` of the site's readiness for the model (0: warm)."""
        self.healthy = True

    @property
    def free(self) -> bool:
        """True if the site may take another shard now (below its cap, not backing off)."""
        return self.healthy and len(self.in_flight) < self.spec.max_in_flight \
            and time.time() >= self.paused_until

    def load(self) -> tuple[int, float]:
        """Readiness, then shards in flight per unit of weight: a warm site before a cold
        one, and among equals the least loaded gets the next shard."""
        return self.tier, len(self.in_flight) / self.spec.weight


class CampaignRunner:
    """Runs one campaign to completion (or until cancelled / ``stop`` is set)."""

    def __init__(self, folder: Path, *, transports: dict[str, Any] | None = None,
                 auth: Any = None, stop: threading.Event | None = None,
                 poll_s: float = 0.5) -> None:
        self.folder = Path(folder)
        self.manifest: Manifest = store.load(self.folder)
        self.auth = auth
        self.stop = stop or threading.Event()
        self.poll_s = poll_s
        self._given = dict(transports or {})
        self._opened: list[Any] = []
        self._states: SiteStates | None = None
        self.ledger: Ledger | None = None
        self.identity: dict[str, Any] = {"name": self.manifest.model,
                                         "version": self.manifest.version, "sha256": None}

    # -- life cycle ---------------------------------------------------------------------------

    def run(self) -> str:
        """Run until done, cancelled or stopped; returns the final status."""
        lock = (self.folder / store.LOCK).open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise InvalidRequest(f"campaign {self.manifest.name} is already being run "
                                 f"(pid {store.runner_pid(self.folder)})") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        self.ledger = Ledger(self.folder / store.LEDGER)
        try:
            return self._run()
        except BaseException as exc:
            if isinstance(exc, FabricError | OSError):
                self.ledger.set(status="failed", last_error=str(exc), finished=time.time())
            raise
        finally:
            for transport in self._opened:
                transport.close()
            self.ledger.close()
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()

    def _run(self) -> str:
        assert self.ledger is not None
        ledger = self.ledger
        status = ledger.transition("running", ("done", "cancelled", "cancelling", "recurring"),
                                   started=ledger.get("started") or time.time(), finished=None)
        if status != "running":
            if status == "cancelling":
                ledger.set(status="cancelled")
            return "cancelled" if status == "cancelling" else str(status)
        self._recover()
        slots = [SiteSlot(spec, self._transport(spec)) for spec in self.manifest.sites]
        states = self._states = self._site_states(slots)
        try:
            return self._loop(slots, states)
        finally:
            if states is not None:
                states.close()

    def _site_states(self, slots: list[SiteSlot]) -> SiteStates | None:
        """The member sites' cached states, for a campaign over several sites."""
        if len(slots) < 2:
            return None
        by_name = {slot.transport.site: slot for slot in slots}
        if len(by_name) < len(slots):
            return None  # two slots of one site (tests): nothing to choose between
        for slot in slots:
            if hasattr(slot.transport, "autostart"):
                slot.transport.autostart = False  # a dead member is skipped, not restarted
        return SiteStates(list(by_name), lambda name: probe(
            by_name[name].transport, self.auth, ROUTING.status_timeout_s), ROUTING)

    def _update_states(self, slots: list[SiteSlot], states: SiteStates | None) -> None:
        if states is None:
            return
        snapshot: list[SiteState] = states.snapshot()
        ranked = {r.site: r for r in rank_sites(snapshot, self.manifest.model, now=time.time())}
        for slot in slots:
            r = ranked.get(slot.transport.site)
            if r is None and slot.healthy:
                log.warning("campaign %s: site %s skipped: %s", self.manifest.name,
                            slot.spec.name, next((s.error for s in snapshot
                                                  if s.site == slot.transport.site), None))
            slot.healthy = r is not None
            slot.tier = TIERS.index(r.tier) if r is not None else len(TIERS)

    def _loop(self, slots: list[SiteSlot], states: SiteStates | None) -> str:
        assert self.ledger is not None
        ledger = self.ledger
        while True:
            if ledger.get("status") == "cancelling":
                self._abandon(slots, "cancelled")
                ledger.set(status="cancelled", finished=time.time())
                return "cancelled"
            if self.stop.is_set():
                # The host is stopping (site shutdown): in-flight inputs are requeued on the
                # next start; the campaign stays queued for whoever runs it next.
                self._abandon(slots, "runner stopped")
                ledger.set(status="queued")
                return "queued"
            self._update_states(slots, states)
            self._dispatch(slots)
            futures = [f for s in slots for f in s.in_flight]
            if not futures:
                counts = ledger.counts()
                if counts["pending"] == 0 and counts["running"] == 0:
                    if self.manifest.output_format == "parquet":
                        # Made once from the committed JSONL (Parquet cannot be appended and
                        # truncated as the ledger needs). If it fails the campaign is failed,
                        # not done, and `resume` writes it again without rerunning anything.
                        from fabric.campaign.export import write_all

                        write_all(self.folder)
                    if ledger.transition("done", ("cancelling",),
                                         finished=time.time()) == "done":
                        return "done"
                    continue  # cancelled as it finished: the check above ends it so
                time.sleep(self.poll_s)  # every site is backing off
                continue
            done, _ = cf.wait(futures, timeout=self.poll_s, return_when=cf.FIRST_COMPLETED)
            for slot in slots:
                for fut in [f for f in slot.in_flight if f in done]:
                    shard_id, _ = slot.in_flight.pop(fut)
                    self._finish(slot, shard_id, fut)
                self._expire(slot)

    def _recover(self) -> None:
        """Truncate outputs to the committed offsets and requeue inputs left running."""
        assert self.ledger is not None
        out = Path(self.manifest.output)
        out.mkdir(parents=True, exist_ok=True)
        for name, key in ((store.RESULTS, "out_offset"), (store.ERRORS, "err_offset")):
            path = out / name
            committed = int(self.ledger.get(key) or 0)
            with path.open("ab") as fh:
                if fh.tell() > committed:
                    log.warning("%s: dropping %d uncommitted bytes after a crash", path,
                                fh.tell() - committed)
                elif fh.tell() < committed:  # truncating up would pad it with NUL bytes
                    raise store.output_lost(path, committed, fh.tell())
                fh.truncate(committed)
                os.fsync(fh.fileno())
        n = self.ledger.requeue_running()
        if n:
            log.info("campaign %s: %d in-flight inputs requeued", self.manifest.name, n)

    def _transport(self, spec: SiteSpec) -> Any:
        if spec.name in self._given:
            return self._given[spec.name]
        from fabric.client.transport import open_transport

        transport = open_transport(spec.name, state_dir=spec.state_dir)
        self._opened.append(transport)
        return transport

    # -- dispatch and settle ------------------------------------------------------------------

    def _dispatch(self, slots: list[SiteSlot]) -> None:
        from fabric.wire.functions import run_shard

        assert self.ledger is not None
        m = self.manifest
        while True:
            free = sorted((s for s in slots if s.free), key=SiteSlot.load)
            if not free:
                return
            slot = free[0]
            shard_id = uuid.uuid4().hex[:16]
            claimed = self.ledger.claim(shard_id, slot.transport.site, m.shard_size)
            if not claimed:
                return
            shard = {"campaign": m.name, "shard_id": shard_id, "model": m.model,
                     "version": m.version, "concurrency": m.concurrency,
                     "timeout_s": m.shard_timeout_s, "audit": m.audit,
                     "items": [{"custom_id": c, "attempt": a, "request": r}
                               for c, a, r in claimed]}
            try:
                fut = slot.transport.submit(run_shard, shard, self.auth)
            except FabricError as exc:
                if isinstance(exc, EndpointError) and self._states is not None:
                    # A member site is unreachable: nothing ran, so the inputs keep their
                    # attempt and go back to pending for the other sites.
                    self._give_back(shard_id, f"{slot.spec.name}: {exc.message}")
                    self._site_down(slot, exc)
                    continue
                self._settle(shard_id, slot.transport.site, None, exc)
                self._backoff(slot, exc)
                continue
            slot.in_flight[fut] = (shard_id, time.monotonic())

    def _finish(self, slot: SiteSlot, shard_id: str, fut: cf.Future[Any]) -> None:
        try:
            reply = fut.result()
        except Exception as exc:  # worker killed, site gone, transport closed...
            err = exc if isinstance(exc, FabricError) else FabricError(
                f"{type(exc).__name__}: {exc}")
            log.warning("shard %s at %s failed: %s", shard_id, slot.spec.name, err)
            self._settle(shard_id, slot.transport.site, None, err)
            if isinstance(err, EndpointError):
                self._site_down(slot, err)
            else:
                self._backoff(slot, err)
            return
        slot.failures = 0
        self._settle(shard_id, slot.transport.site, reply, None)

    def _expire(self, slot: SiteSlot) -> None:
        limit = self.manifest.shard_timeout_s + 30.0
        for fut, (shard_id, started) in list(slot.in_flight.items()):
            if time.monotonic() - started > limit:
                slot.in_flight.pop(fut)
                fut.cancel()
                self._settle(shard_id, slot.transport.site, None, FabricError(
                    f"shard {shard_id} gave no answer in {limit:.0f} s", kind="ShardTimeout"))

    def _abandon(self, slots: list[SiteSlot], why: str) -> None:
        for slot in slots:
            for fut, (shard_id, _) in list(slot.in_flight.items()):
                fut.cancel()
                self._give_back(shard_id, why)
            slot.in_flight.clear()

    def _give_back(self, shard_id: str, why: str) -> None:
        """Not the inputs' fault: give back their attempt and leave them pending."""
        assert self.ledger is not None
        with self.ledger.tx() as c:
            c.execute("UPDATE items SET state='pending', attempts=MAX(attempts-1,0) "
                      "WHERE state='running' AND shard=?", (shard_id,))
            c.execute("UPDATE shards SET state='lost', error=?, finished=? WHERE id=?",
                      (why, time.time(), shard_id))

    def _site_down(self, slot: SiteSlot, err: FabricError) -> None:
        """The site could not be reached: skip it until its status call answers again (or,
        alone or without states, back off as for any failure)."""
        if self._states is not None:
            slot.healthy = False
            self._states.mark_down(slot.transport.site, f"{type(err).__name__}: {err.message}")
            assert self.ledger is not None
            self.ledger.set(last_error=f"{slot.spec.name}: {err.message}")
        else:
            self._backoff(slot, err)

    def _backoff(self, slot: SiteSlot, err: FabricError) -> None:
        slot.failures += 1
        delay = min(MAX_BACKOFF_S, 0.5 * 2 ** min(slot.failures, 8)) if slot.failures > 1 else 0
        slot.paused_until = time.time() + delay
        assert self.ledger is not None
        self.ledger.set(last_error=f"{slot.spec.name}: {err.message}")

    def _settle(self, shard_id: str, site: str, reply: dict[str, Any] | None,
                err: FabricError | None) -> None:
        """Turn a shard's reply (or its failure) into lines and one ledger commit."""
        assert self.ledger is not None
        m = self.manifest
        running = self.ledger.running_in(shard_id)
        by_id: dict[str, dict[str, Any]] = {}
        shard_site: str = site
        if reply is not None:
            by_id = {r["custom_id"]: r for r in reply.get("results") or []}
            shard_site = str(reply.get("site") or site)
            if reply.get("model"):
                self.identity = dict(reply["model"])
        lines = self._lines(running)
        out_lines, err_lines = [], []
        done, failed, retry = [], [], []
        for cid, attempt in running.items():
            rec = by_id.get(cid)
            extra = {"attempt": attempt, "shard": shard_id, "site": shard_site}
            if rec is not None and rec.get("ok"):
                result = dict(rec["result"])
                identity = result.pop("model", None) or self.identity
                usage = result.pop("usage", None) or {}
                result.pop("request_id", None)
                provenance = result.pop("provenance", None)
                out_lines.append({"custom_id": cid, "line": lines.get(cid), "model": identity,
                                  "usage": usage, "response": result, "nonce": rec["nonce"],
                                  "provenance": provenance, **extra})
                done.append((cid, rec["nonce"], int(usage.get("prompt_tokens", 0))
                             + int(usage.get("completion_tokens", 0))))
                continue
            error = rec["error"] if rec is not None else (err or FabricError(
                "the shard's reply has no result for this input")).to_dict()
            if rec is None and err is not None and err.details.get("kind"):
                error = {**error, "kind": err.details["kind"]}  # e.g. ShardTimeout
            if attempt < m.max_attempts:
                retry.append(cid)
                continue
            err_lines.append(store.error_line(cid, lines.get(cid), error, self.identity,
                                              attempts=attempt,
                                              nonce=rec.get("nonce") if rec else None, **extra))
            failed.append((cid, str(error.get("kind")), str(error.get("message"))[:2000]))
        out = Path(m.output)
        # Output first, ledger second: see the ``ledger`` module docstring.
        # Each file must still hold what the ledger committed (not removed or cut meanwhile).
        out_size = store.write_lines(out / store.RESULTS, out_lines,
                                     expect=int(self.ledger.get("out_offset") or 0))
        err_size = store.write_lines(out / store.ERRORS, err_lines,
                                     expect=int(self.ledger.get("err_offset") or 0))
        state = "ok" if err is None else "failed"
        self.ledger.settle(shard_id, done=done, failed=failed, retry=retry, shard_state=state,
                           shard_error=err.message if err else None,
                           offsets=(out_size, err_size))

    def _lines(self, running: dict[str, int]) -> dict[str, int]:
        assert self.ledger is not None
        if not running:
            return {}
        marks = ",".join("?" * len(running))
        rows = self.ledger.conn.execute(
            f"SELECT custom_id, line FROM items WHERE custom_id IN ({marks})", list(running))
        return {str(c): int(n) for c, n in rows}
