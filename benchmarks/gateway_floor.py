"""What 32 streams through ``fabric serve`` cost before any model: the gateway's HTTP path and
the ``openai`` client, with a stand-in behind the gateway that answers every stream at once.
Prints JSON.

    python benchmarks/gateway_floor.py            # 32 streams of 16 chunks, 6 rounds per style
    python benchmarks/gateway_floor.py --quick

``benchmarks/gateway.py`` compares 32 streams through the gateway with the same 32 through the
SDK, on a real model server. This one takes the site and the server away: ``fabric serve``
runs as users run it (uvicorn, its own process, 127.0.0.1, ``fabric.gateway.app.serve``), but
its client is ``Instant``, whose streams yield their chunks as soon as they are asked. What is
left is the part of the gateway's time to first token that no change at the site or the
server can remove:

* ``openai``: the ``openai`` client's streams (``threads``: ``OpenAI``, a thread each;
  ``asyncio``: ``AsyncOpenAI``, a task each), as ``gateway.py`` runs them (its ``Sides``);
* ``raw``: the same requests written straight to 32 sockets at once (no client library):
  the gateway's own share;
* per stream: the CPU time of the gateway's process and of this (client) process;
* ``single``: lone streams, one after another.

Times are from each call (``gateway.py``'s clock) or, for ``raw``, from the burst's start.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import common
from common import log, median, summary
from gateway import Sides, answering, figures, free_port, prompts

from fabric.aio import AsyncStream

MODEL = "smollm2-135m"
"""The model name the requests ask for (the stand-in serves any)."""


class InstantStream(AsyncStream):
    """A stream whose chunks are all there: what ``pieces`` reads of an ``AsyncStream``."""

    def __init__(self, chunks: int) -> None:  # no Stream underneath
        self.left = chunks
        self.request_id = f"instant-{time.monotonic_ns()}"
        self.finished = False
        self.last_token_ids: list[int] = [0]
        self.last_logprobs: list[float] = []
        self.result = SimpleNamespace(finish_reason="length", usage=SimpleNamespace(
            prompt_tokens=4, completion_tokens=chunks, total_tokens=4 + chunks))

    async def __anext__(self) -> str:
        if not self.left:
            self.finished = True
            raise StopAsyncIteration
        self.left -= 1
        return " word"

    def close_soon(self) -> None:
        """Nothing runs anywhere to cancel."""


class Instant:
    """Stands in for the gateway's ``AsyncFabric``: streams of ``chunks`` chunks, at once."""

    site = "instant"
    sites = ["instant"]

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks

    async def stream(self, prompt: str | None = None, **kwargs: Any) -> InstantStream:
        """A stream of ``self.chunks`` chunks (``max_tokens`` is ignored)."""
        return InstantStream(self.chunks)

    async def models(self) -> list[dict[str, Any]]:
        """One catalog entry."""
        return [{"name": MODEL, "version": "1"}]

    def close(self) -> None:
        """Nothing to close."""


def serve(port: int, chunks: int, home: Path) -> None:
    """The gateway process: ``fabric serve``'s server with ``Instant`` behind it."""
    from fabric.gateway.app import serve as serve_gateway
    from fabric.gateway.config import GatewayConfig

    serve_gateway(GatewayConfig(port=port, home=home, rate=0), Instant(chunks))  # type: ignore[arg-type]


def start(port: int, chunks: int, home: Path) -> subprocess.Popen[bytes]:
    """This script as the gateway process; returns once it answers ``/health``."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--chunks", str(chunks), "--home",
         str(home)], stdout=subprocess.DEVNULL, stderr=open(home / "gateway.log", "wb"))  # noqa: SIM115
    return answering(proc, port, home / "gateway.log")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def raw_burst(port: int, streams: int) -> list[float]:
    """``streams`` requests written to as many open sockets at once; each one's time from the
    burst's start to its first body bytes (past the response's headers), in seconds."""
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 16,
                       "stream": True}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
               f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
    try:
        t0 = time.perf_counter()
        for s in socks:
            s.sendall(request)
        out = []
        for s in socks:
            got = b""
            while b"data:" not in got:
                part = s.recv(65536)
                if not part:
                    raise RuntimeError("the gateway closed a raw stream")
                got += part
            out.append(time.perf_counter() - t0)
        return out
    finally:
        for s in socks:
            s.close()


def measure_style(port: int, style: str, streams: int, rounds: int, chunks: int,
                  gateway_pid: int) -> dict[str, Any]:
    """``rounds`` bursts of ``streams`` openai streams in ``style``, and lone streams."""
    sides = Sides(None, MODEL, f"http://127.0.0.1:{port}/v1", 60.0, style)
    try:
        sides.gateway(prompts(streams, 10**6), chunks)  # warm: connections, threads
        cpu_gw, cpu_me, runs = cpu_s(gateway_pid), time.process_time(), []
        for r in range(rounds):
            runs.append(sides.gateway(prompts(streams, r * streams), chunks))
        cpu_gw, cpu_me = cpu_s(gateway_pid) - cpu_gw, time.process_time() - cpu_me
        one = sides.gateway_one(4)
        lone = [sides.run(one(text)) if style == "asyncio" else one(text)  # type: ignore[arg-type]
                for text in prompts(12, 10**7)]
    finally:
        sides.close()
    out = figures(runs)
    n = rounds * streams
    return {"burst": {k: out[k] for k in ("ttft_ms", "admit_ms", "ttft_median_per_round_ms")},
            "gateway_cpu_ms_per_stream": round(cpu_gw * 1000 / n, 2),
            "client_cpu_ms_per_stream": round(cpu_me * 1000 / n, 2),
            "single_ttft_ms": summary([t.first * 1000 for t in lone])}


def main() -> int:
    """Run every style against one stand-in gateway and print the JSON figure."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--chunks", type=int, default=16, help="chunks per stream (default 16)")
    p.add_argument("--rounds", type=int, default=6, help="bursts per style (default 6)")
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--home", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve is not None:
        serve(args.serve, args.chunks, args.home)
        return 0
    if args.quick:
        args.streams, args.rounds = 8, 2
    home = Path(tempfile.mkdtemp(prefix="fabric-gateway-floor-"))
    port = free_port()
    proc = start(port, args.chunks, home)
    try:
        styles = {}
        for style in ("threads", "asyncio"):
            log(f"{style}: {args.rounds} bursts of {args.streams} openai streams")
            styles[style] = measure_style(port, style, args.streams, args.rounds, args.chunks,
                                          proc.pid)
        log(f"raw: {args.rounds} bursts of {args.streams} requests on sockets")
        cpu = cpu_s(proc.pid)
        raw = [raw_burst(port, args.streams) for _ in range(args.rounds)]
        raw_cpu = (cpu_s(proc.pid) - cpu) * 1000 / (args.rounds * args.streams)
    finally:
        proc.terminate()
        proc.wait(10)
    common.emit({
        "benchmark": "gateway_floor", "streams": args.streams, "chunks": args.chunks,
        "rounds": args.rounds,
        **{f"openai_{style}": fig for style, fig in styles.items()},
        "raw": {"first_bytes_ms": summary([x * 1000 for r in raw for x in r]),
                "first_bytes_median_per_round_ms": [round(median(r) * 1000, 1) for r in raw],
                "gateway_cpu_ms_per_stream": round(raw_cpu, 2)},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
