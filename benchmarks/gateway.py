"""32 concurrent streams through ``fabric serve`` with the ``openai`` client vs the same streams
through the SDK, on one warm model server at a temporary local site. Prints JSON.

    python benchmarks/gateway.py                      # SmolLM2, 32 streams of 64 tokens
    python benchmarks/gateway.py --model tiny --streams 8 --max-tokens 16   # quick check

The gateway runs as users run it (``fabric serve`` in its own process, on 127.0.0.1). Each side
is held for the whole run, as a user holds a client: one ``Fabric`` (or an ``AsyncFabric`` over
it) and one ``openai`` client (its connection pool kept ``--keepalive-s`` seconds, so a burst
reuses the connections of the last one; ``--cold``: a new client per round, every connection
opened during the burst). ``--style`` says how both sides' callers run: ``threads`` (default), a
thread per stream (``Fabric.stream`` / ``OpenAI``), ``asyncio``, a task per stream on one event
loop (``AsyncFabric.stream`` / ``AsyncOpenAI``), or ``mixed`` (SDK threads vs ``AsyncOpenAI``,
the pairing measured before). Rounds alternate SDK and gateway (``--rounds``). Both sides clock
the same points: from just before the call (``stream`` / ``completions.create``) to the first
non-empty text chunk in the caller's code; ``admit_ms`` is the time until the call returned
(the SDK: admitted and connected to the server; the gateway: its response headers, sent once
the gateway's own SDK stream is admitted).

``throughput_ratio`` = gateway tokens/s / SDK tokens/s (the issue's target is >= 0.9);
``ttft_median_diff_ms`` = the gateway's median time to first token minus the SDK's (target:
within +10 ms), ``ttft_median_diff_ms_95`` its 95% interval (resampling whole rounds). With 32
streams at once the first token of most of them comes at the end of one server step (the
prefill of everyone admitted by then), so a few ms of arrival can move a stream into the next
step: the median jumps by whole steps between rounds of the same side.
``--single N`` adds N alternating pairs of lone streams (4 tokens), free of that effect: the
gateway's own added latency per request (``single.ttft_median_diff_ms``).
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import common
from campaign_throughput import write_site
from common import log, median, ratio


def prompts(n: int, offset: int) -> list[str]:
    """Distinct short prompts (distinct per round, so no prefix is cached across rounds)."""
    return [f"Story {offset + i}: once upon a time, a scientist" for i in range(n)]


class Timing(NamedTuple):
    """One stream's figures (seconds from its call)."""

    first: float
    """Time to its first text."""
    admit: float
    """Time until the call returned."""
    tokens: int
    end: float
    """When it ended (``perf_counter``)."""
    wire: float = 0.0
    """Time until the ``openai`` client handed the request to its HTTP library (0: SDK)."""


One = Callable[[str], Timing] | Callable[[str], Awaitable[Timing]]
"""How one stream of a side is run: a blocking call (a thread each) or a coroutine."""


def burst(sides: Sequence[tuple[One, list[str]]], loop: asyncio.AbstractEventLoop
          ) -> list[dict[str, Any]]:
    """Every side's prompts at once (a thread per blocking stream, released by one barrier;
    a task per coroutine stream on ``loop``), the sides' streams interleaved in that order;
    one round's figures per side."""
    order = sorted(((j, k) for k, (_, texts) in enumerate(sides) for j in range(len(texts))))
    calls = [(sides[k][0], sides[k][1][j]) for j, k in order]
    out: list[Timing] = [Timing(0.0, 0.0, 0, 0.0)] * len(calls)
    blocking = [i for i, (one, _) in enumerate(calls) if not asyncio.iscoroutinefunction(one)]
    tasks = [i for i in range(len(calls)) if i not in set(blocking)]
    start = threading.Barrier(len(blocking) + 1)

    def run(i: int) -> None:
        start.wait()
        out[i] = calls[i][0](calls[i][1])  # type: ignore[assignment]

    async def gather() -> None:
        done = await asyncio.gather(*(calls[i][0](calls[i][1]) for i in tasks))  # type: ignore[arg-type]
        for i, timing in zip(tasks, done, strict=True):
            out[i] = timing

    threads = [threading.Thread(target=run, args=(i,)) for i in blocking]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    together = asyncio.run_coroutine_threadsafe(gather(), loop) if tasks else None
    for t in threads:
        t.join()
    if together is not None:
        together.result(900)
    rounds = []
    for k in range(len(sides)):
        part = [timing for (_, side), timing in zip(order, out, strict=True) if side == k]
        rounds.append({"seconds": max(t.end for t in part) - t0,
                       "tokens": sum(t.tokens for t in part), "ttft": [t.first for t in part],
                       "admit": [t.admit for t in part], "wire": [t.wire for t in part]})
    return rounds


class Sides:
    """The two users of one run, each held for the whole run as a user holds a client: the
    SDK (``Fabric`` for threads, ``AsyncFabric`` over it for asyncio) and the ``openai``
    client (``OpenAI`` / ``AsyncOpenAI``; its connection pool kept ``keepalive_s`` seconds,
    None: the client's defaults). Coroutines run on one event loop in a thread of its own."""

    def __init__(self, fab: Any, model: str, base_url: str, keepalive_s: float | None,
                 style: str) -> None:
        self.fab, self.model, self.base_url, self.keepalive_s = fab, model, base_url, keepalive_s
        self.sdk_style, self.gw_style = STYLES[style]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        from fabric.aio import AsyncFabric

        # No SDK side (fab None): only the gateway's (benchmarks/gateway_floor.py).
        self.afab = None if fab is None else AsyncFabric(fabric=fab)
        self.client: Any = None
        self.renew()

    def run(self, coro: Any) -> Any:
        """Run ``coro`` on the loop; its value."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(900)

    def renew(self) -> None:
        """A new ``openai`` client (no pooled connections)."""
        import openai

        try:  # the HTTP library this openai client is built on
            import httpx2 as httpx
        except ImportError:
            import httpx  # type: ignore[no-redef]

        limits = None if self.keepalive_s is None else httpx.Limits(
            max_connections=1000, max_keepalive_connections=1000,
            keepalive_expiry=self.keepalive_s)
        kw: dict[str, Any] = {"base_url": self.base_url, "api_key": "EMPTY", "max_retries": 0,
                              "timeout": 600}
        http_kw: dict[str, Any] = {} if limits is None else {"limits": limits}
        self.close_client()
        if self.gw_style == "threads":
            http_kw["event_hooks"] = {"request": [lambda _: _on_wire()]}
            self.client = openai.OpenAI(http_client=openai.DefaultHttpxClient(**http_kw), **kw)
        else:
            async def hook(_: Any) -> None:
                _on_wire()

            async def make() -> Any:
                http_kw["event_hooks"] = {"request": [hook]}
                return openai.AsyncOpenAI(http_client=openai.DefaultAsyncHttpxClient(**http_kw),
                                          **kw)
            self.client = self.run(make())

    def close_client(self) -> None:
        """Close the ``openai`` client, if any."""
        if self.client is None:
            return
        if self.gw_style == "threads":
            self.client.close()
        else:
            self.run(self.client.close())
        self.client = None

    def close(self) -> None:
        """Close the clients and stop the loop."""
        self.close_client()
        if self.afab is not None:
            self.run(self.afab.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    # -- one round of each side ----------------------------------------------------------------

    def sdk(self, texts: list[str], max_tokens: int) -> dict[str, Any]:
        """Every prompt streamed through the SDK at once."""
        return burst([(self.sdk_one(max_tokens), texts)], self.loop)[0]

    def gateway(self, texts: list[str], max_tokens: int) -> dict[str, Any]:
        """Every prompt streamed through the gateway at once."""
        return burst([(self.gateway_one(max_tokens), texts)], self.loop)[0]

    def together(self, sdk: list[str], gateway: list[str], max_tokens: int,
                 gateway_first: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """Both sides' prompts in one burst, interleaved (so both meet the same server steps);
        ``gateway_first``: which side's stream starts each pair. (SDK round, gateway round)."""
        runs = [(self.sdk_one(max_tokens), sdk), (self.gateway_one(max_tokens), gateway)]
        if gateway_first:
            g, s = burst(runs[::-1], self.loop)
            return s, g
        s, g = burst(runs, self.loop)
        return s, g

    def sdk_one(self, max_tokens: int) -> One:
        """One SDK stream (``Fabric.stream`` or ``AsyncFabric.stream``)."""
        model = self.model
        if self.sdk_style == "threads":
            def one(text: str) -> Timing:
                clock = Clock()
                with self.fab.stream(text, model=model, max_tokens=max_tokens) as stream:
                    clock.admitted()
                    for chunk in stream:
                        clock.text(chunk)
                return clock.timing(len(stream.token_ids))
            return one

        async def aone(text: str) -> Timing:
            clock = Clock()
            async with await self.afab.stream(text, model=model, max_tokens=max_tokens) as stream:
                clock.admitted()
                async for chunk in stream:
                    clock.text(chunk)
            return clock.timing(len(stream.token_ids))
        return aone

    def gateway_one(self, max_tokens: int) -> One:
        """One stream through the gateway (``completions.create``, ``stream=True``)."""
        kw = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}}
        if self.gw_style == "threads":
            def one(text: str) -> Timing:
                clock = Clock()
                stream = self.client.completions.create(prompt=text, **kw)
                clock.admitted()
                for chunk in stream:
                    clock.openai(chunk)
                return clock.timing()
            return one

        async def aone(text: str) -> Timing:
            clock = Clock()
            stream = await self.client.completions.create(prompt=text, **kw)
            clock.admitted()
            async for chunk in stream:
                clock.openai(chunk)
            return clock.timing()
        return aone


class Clock:
    """One stream's clock, started at the call: when the ``openai`` client handed its request
    to the HTTP library (``wire``), when the call returned, its first non-empty text."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.admit = self.first = self.wire = 0.0
        self.tokens = 0
        CLOCK.set(self)

    def admitted(self) -> None:
        """The call returned (the stream is open)."""
        self.admit = time.perf_counter() - self.t0

    def text(self, chunk: str) -> None:
        """A text chunk came."""
        if chunk and not self.first:
            self.first = time.perf_counter() - self.t0

    def openai(self, chunk: Any) -> None:
        """An ``openai`` completion chunk came (text, or the usage at the end)."""
        self.text(chunk.choices[0].text if chunk.choices else "")
        if chunk.usage is not None:
            self.tokens = chunk.usage.completion_tokens

    def timing(self, tokens: int | None = None) -> Timing:
        """The stream's ``Timing`` (``tokens``: the count, if not from usage chunks)."""
        return Timing(self.first, self.admit, self.tokens if tokens is None else tokens,
                      time.perf_counter(), self.wire)


CLOCK: contextvars.ContextVar[Clock] = contextvars.ContextVar("clock")
"""The clock of the stream the running thread (or task) is calling: each thread, and each
asyncio task, has its own context."""


def _on_wire() -> None:
    """The HTTP library's request hook: the ``openai`` client is done building the request."""
    clock = CLOCK.get(None)
    if clock is not None and not clock.wire:
        clock.wire = time.perf_counter() - clock.t0


STYLES = {"threads": ("threads", "threads"), "asyncio": ("asyncio", "asyncio"),
          "mixed": ("threads", "asyncio")}
"""--style -> how (SDK, openai) callers run: a thread per stream, or a task per stream on
one event loop; ``mixed`` is the pairing of the runs before session 12."""


def single_pairs(sides: Sides, pairs: int) -> dict[str, Any]:
    """``pairs`` lone streams each way, alternating: TTFT without any batching effect."""
    sdk: list[float] = []
    gw: list[float] = []
    for i in range(pairs):
        sdk += sides.sdk(prompts(1, 10**7 + 2 * i), 4)["ttft"]
        gw += sides.gateway(prompts(1, 10**7 + 2 * i + 1), 4)["ttft"]
    s = common.summary(sdk, scale=1000.0, digits=1)
    g = common.summary(gw, scale=1000.0, digits=1)
    return {"pairs": pairs, "sdk_ttft_ms": s, "gateway_ttft_ms": g,
            "ttft_median_diff_ms": round(g["median"] - s["median"], 1)}


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_gateway(site_dir: Path, home: Path, port: int) -> subprocess.Popen[bytes]:
    """``fabric serve`` in its own process; returns once it answers ``/health``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fabric.cli.main", "serve", "--site", str(site_dir), "--port",
         str(port), "--home", str(home), "--rate", "0"],
        stdout=subprocess.DEVNULL, stderr=open(home / "gateway.log", "wb"))  # noqa: SIM115
    return answering(proc, port, home / "gateway.log")


def answering(proc: subprocess.Popen[bytes], port: int, log_path: Path
              ) -> subprocess.Popen[bytes]:
    """``proc`` once the gateway it runs answers ``/health`` on ``port`` (killed, with its
    log in the error, if it exits or does not answer within 60 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited: {log_path.read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the gateway did not answer within 60 s")


def stop_everything(gateway: subprocess.Popen[bytes] | None, site_dir: Path) -> None:
    """Stop the gateway (if started) and the site with its model servers."""
    from fabric.client.local import stop_site

    if gateway is not None:
        gateway.terminate()
        gateway.wait(10)
    stop_site(str(site_dir), all=True)


def figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s over all rounds and the median TTFT (ms) over all streams."""
    seconds = sum(r["seconds"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    ttft = [x for r in runs for x in r["ttft"]]
    admit = [x for r in runs for x in r["admit"]]
    wire = [x for r in runs for x in r["wire"]]
    return {"tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "ttft_ms": common.summary(ttft, scale=1000.0, digits=1),
            "admit_ms": common.summary(admit, scale=1000.0, digits=1),
            "wire_ms": common.summary(wire, scale=1000.0, digits=1),
            "ttft_median_per_round_ms": [round(median(r["ttft"]) * 1000, 1) for r in runs]}


def together_figures(rounds: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """The TTFT difference of rounds that sent both sides' streams in one burst: both halves
    meet the same server steps, so the difference is free of the round-to-round swing."""
    sdk = [[x * 1000 for x in s["ttft"]] for s, _ in rounds]
    gw = [[x * 1000 for x in g["ttft"]] for _, g in rounds]
    pooled_sdk = median([x for r in sdk for x in r])
    pooled_gw = median([x for r in gw for x in r])
    per_round = [round(median(g) - median(s), 1) for s, g in zip(sdk, gw, strict=True)]
    return {"rounds": len(rounds), "streams_each": len(sdk[0]),
            "ttft_median_sdk_ms": round(pooled_sdk, 1),
            "ttft_median_gateway_ms": round(pooled_gw, 1),
            "ttft_median_diff_ms": round(pooled_gw - pooled_sdk, 1),
            "ttft_median_diff_ms_95": common.bootstrap_diff(sdk, gw, paired=True),
            "ttft_median_diff_per_round_ms": per_round,
            "ttft_median_diff_median_of_rounds_ms": round(median(per_round), 1),
            "ttft_median_diff_median_of_rounds_ms_95": common.bootstrap_median(per_round),
            "admit_median_diff_ms": round(
                median([x for _, g in rounds for x in g["admit"]]) * 1000
                - median([x for s, _ in rounds for x in s["admit"]]) * 1000, 1)}


def main() -> int:
    """Run both sides and print the JSON figure."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="catalog model, or 'tiny'")
    p.add_argument("--streams", type=int, default=32, help="concurrent streams (default 32)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="rounds per side, alternating")
    p.add_argument("--workers", type=int, default=4, help="request workers at the site")
    p.add_argument("--threads", type=int, default=1, help="OMP threads of the server")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="the server's tokens per step (default: the site default)")
    p.add_argument("--keepalive-s", type=float, default=60.0,
                   help="how long the openai client keeps idle connections (default 60)")
    p.add_argument("--cold", action="store_true",
                   help="a new openai client per round (every connection opened in the burst)")
    p.add_argument("--style", choices=sorted(STYLES), default="threads",
                   help="how both sides' callers run: a thread per stream (default), a task "
                        "per stream on one event loop, or mixed (SDK threads, AsyncOpenAI)")
    p.add_argument("--together", type=int, default=0,
                   help="also N rounds of one burst with half the streams through each side, "
                        "interleaved (a paired comparison; default 0)")
    p.add_argument("--single", type=int, default=0,
                   help="also N alternating pairs of lone 4-token streams (default 0)")
    args = p.parse_args()
    if args.quick:
        args.model, args.streams, args.max_tokens, args.rounds = "tiny", 8, 16, 1

    from fabric import Fabric
    from fabric.client.local import start_site

    tmp = Path(tempfile.mkdtemp(prefix="fabric-gateway-bench-"))
    model, model_dir = args.model, None
    if model == "tiny":
        from fabric.testing.tiny import build_tiny_llama

        model, model_dir = "tiny-llama", build_tiny_llama(tmp / "tiny")
    server = {} if args.max_batch_tokens is None else {"max_batch_tokens": args.max_batch_tokens}
    site_dir = write_site(tmp / "site", model, model_dir, args.workers, args.threads, server)
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    start_site(str(site_dir), timeout_s=600)
    gateway = sides = None
    single: dict[str, Any] | None = None
    try:
        fab = Fabric(site=str(site_dir), on_status=None)
        fab.generate("warm up", model=model, max_tokens=2)
        port = free_port()
        gateway = start_gateway(site_dir, tmp, port)
        sides = Sides(fab, model, f"http://127.0.0.1:{port}/v1",
                      None if args.cold else args.keepalive_s, args.style)
        # Warm both sides alike: one burst each (the gateway's pool threads, the client's
        # connections; the SDK's reader threads and its connection to the site).
        sides.gateway(prompts(args.streams, 10**6), 2)
        sides.sdk(prompts(args.streams, 2 * 10**6), 2)
        sdk, gw, mixed = [], [], []
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}: SDK")
            sdk.append(sides.sdk(prompts(args.streams, 2 * r * args.streams), args.max_tokens))
            log(f"round {r + 1}/{args.rounds}: gateway")
            if args.cold:
                sides.renew()
            gw.append(sides.gateway(prompts(args.streams, (2 * r + 1) * args.streams),
                                    args.max_tokens))
        for r in range(args.together):
            log(f"together {r + 1}/{args.together}: {args.streams // 2} streams each way")
            half = args.streams // 2
            mixed.append(sides.together(prompts(half, 10**5 + 2 * r * half),
                                        prompts(half, 10**5 + (2 * r + 1) * half),
                                        args.max_tokens, gateway_first=r % 2 == 1))
        if args.single:
            log(f"{args.single} lone streams each way")
            single = single_pairs(sides, args.single)
        fab.close()
    finally:
        if sides is not None:
            sides.close()
        stop_everything(gateway, site_dir)
    s, g = figures(sdk), figures(gw)
    common.emit({
        "benchmark": "gateway", "model": model, "streams": args.streams,
        "max_tokens": args.max_tokens, "rounds": args.rounds, "server": server,
        "style": dict(zip(("sdk", "openai"), STYLES[args.style], strict=True)),
        "openai_connections": "new per round" if args.cold else f"kept {args.keepalive_s:g} s",
        "sdk": s, "gateway": g,
        "throughput_ratio": ratio(g["tokens_per_s"] or 0.0, s["tokens_per_s"] or 0.0),
        "ttft_median_diff_ms": round(g["ttft_ms"]["median"] - s["ttft_ms"]["median"], 1),
        "ttft_median_diff_ms_95": common.bootstrap_diff(
            [[x * 1000 for x in r["ttft"]] for r in sdk],
            [[x * 1000 for x in r["ttft"]] for r in gw]),
        "ttft_median_sdk_ms": round(median([x * 1000 for r in sdk for x in r["ttft"]]), 1),
        "admit_median_diff_ms": round(g["admit_ms"]["median"] - s["admit_ms"]["median"], 1),
        "openai_client_ms": g["wire_ms"],
        "ttft_from_wire_median_diff_ms": round(
            median([(f - w) * 1000 for r in gw for f, w in zip(r["ttft"], r["wire"], strict=True)])
            - s["ttft_ms"]["median"], 1),
        "single": single,
        "together": together_figures(mixed) if mixed else None,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
