"""32 concurrent streams through ``fabric serve`` with the ``openai`` client vs the same streams
through the SDK, on one warm model server at a temporary local site. Prints JSON.

    python benchmarks/gateway.py                      # SmolLM2, 32 streams of 64 tokens
    python benchmarks/gateway.py --model tiny --streams 8 --max-tokens 16   # quick check

The gateway runs as users run it (``fabric serve`` in its own process, on 127.0.0.1). Each side
is held for the whole run, as a user holds a client: one ``Fabric`` (its threads each iterate a
``Fabric.stream``) and one ``AsyncOpenAI`` client on one event loop (its connection pool kept
``--keepalive-s`` seconds, so a burst reuses the connections of the last one; ``--cold``: a
new client per round, every connection opened during the burst, as before). Rounds alternate
SDK and gateway (``--rounds``). Both sides clock the same points: from just before the call
(``fab.stream`` / ``completions.create``) to the first non-empty text chunk in the caller's
code; ``admit_ms`` is the time until the call returned (the SDK: admitted and connected to the
server; the gateway: its response headers, sent once the gateway's own SDK stream is admitted).

``throughput_ratio`` = gateway tokens/s / SDK tokens/s (the issue's target is >= 0.9);
``ttft_median_diff_ms`` = the gateway's median time to first token minus the SDK's (target:
within +10 ms). With 32 streams at once the first token of most of them comes at the end of
one server step (the prefill of everyone admitted by then), so a few ms of arrival can move
a stream into the next step: the median jumps by whole steps between rounds of the same side.
``--single N`` adds N alternating pairs of lone streams (4 tokens), free of that effect: the
gateway's own added latency per request (``single.ttft_median_diff_ms``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import common
from campaign_throughput import write_site
from common import log, median, ratio


def prompts(n: int, offset: int) -> list[str]:
    """Distinct short prompts (distinct per round, so no prefix is cached across rounds)."""
    return [f"Story {offset + i}: once upon a time, a scientist" for i in range(n)]


def sdk_round(fab: Any, model: str, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """Every prompt streamed through the SDK at once (one thread each)."""
    ttft: list[float] = [0.0] * len(texts)
    admit: list[float] = [0.0] * len(texts)
    tokens: list[int] = [0] * len(texts)
    start = threading.Barrier(len(texts) + 1)

    def one(i: int) -> None:
        start.wait()
        t0 = time.perf_counter()
        with fab.stream(texts[i], model=model, max_tokens=max_tokens) as stream:
            admit[i] = time.perf_counter() - t0
            for n, _ in enumerate(stream):
                if n == 0:
                    ttft[i] = time.perf_counter() - t0
        tokens[i] = len(stream.token_ids)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return {"seconds": time.perf_counter() - t0, "tokens": sum(tokens), "ttft": ttft,
            "admit": admit}


class GatewayUser:
    """One ``AsyncOpenAI`` client on one event loop (a thread of its own), held across rounds
    as a user holds one; ``keepalive_s`` None: the client's defaults."""

    def __init__(self, base_url: str, keepalive_s: float | None) -> None:
        self.base_url, self.keepalive_s = base_url, keepalive_s
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client: Any = self.run(self._client())

    async def _client(self) -> Any:
        import openai

        try:  # the HTTP library this openai client is built on
            import httpx2 as httpx
        except ImportError:
            import httpx  # type: ignore[no-redef]

        http = None
        if self.keepalive_s is not None:
            http = openai.DefaultAsyncHttpxClient(limits=httpx.Limits(
                max_connections=1000, max_keepalive_connections=1000,
                keepalive_expiry=self.keepalive_s))
        return openai.AsyncOpenAI(base_url=self.base_url, api_key="EMPTY", max_retries=0,
                                  timeout=600, http_client=http)

    def run(self, coro: Any) -> Any:
        """Run ``coro`` on the client's loop; its value."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(900)

    def renew(self) -> None:
        """A new client (no pooled connections)."""
        self.run(self.client.close())
        self.client = self.run(self._client())

    def close(self) -> None:
        """Close the client and stop its loop."""
        self.run(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def gateway_round(client: Any, model: str, texts: list[str],
                        max_tokens: int) -> dict[str, Any]:
    """Every prompt streamed through the gateway at once (one asyncio client)."""
    async def one(text: str) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        first, used = 0.0, 0
        stream = await client.completions.create(
            model=model, prompt=text, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        admit = time.perf_counter() - t0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text and not first:
                first = time.perf_counter() - t0
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
        return first, admit, used

    t0 = time.perf_counter()
    done = await asyncio.gather(*(one(t) for t in texts))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": sum(u for *_, u in done),
            "ttft": [f for f, _, _ in done], "admit": [a for _, a, _ in done]}


def single_pairs(fab: Any, user: GatewayUser, model: str, pairs: int) -> dict[str, Any]:
    """``pairs`` lone streams each way, alternating: TTFT without any batching effect."""
    sdk: list[float] = []
    gw: list[float] = []
    for i in range(pairs):
        sdk += sdk_round(fab, model, prompts(1, 10**7 + 2 * i), 4)["ttft"]
        gw += user.run(gateway_round(user.client, model, prompts(1, 10**7 + 2 * i + 1), 4))["ttft"]
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
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fabric serve exited: {(home / 'gateway.log').read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("fabric serve did not answer within 60 s")


def figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s over all rounds and the median TTFT (ms) over all streams."""
    seconds = sum(r["seconds"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    ttft = [x for r in runs for x in r["ttft"]]
    admit = [x for r in runs for x in r["admit"]]
    return {"tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "ttft_ms": common.summary(ttft, scale=1000.0, digits=1),
            "admit_ms": common.summary(admit, scale=1000.0, digits=1),
            "ttft_median_per_round_ms": [round(median(r["ttft"]) * 1000, 1) for r in runs]}


def main() -> int:
    """Run both sides and print the JSON figure."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="catalog model, or 'tiny'")
    p.add_argument("--streams", type=int, default=32, help="concurrent streams (default 32)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="rounds per side, alternating")
    p.add_argument("--workers", type=int, default=4, help="request workers at the site")
    p.add_argument("--threads", type=int, default=1, help="OMP threads of the server")
    p.add_argument("--keepalive-s", type=float, default=60.0,
                   help="how long the openai client keeps idle connections (default 60)")
    p.add_argument("--cold", action="store_true",
                   help="a new openai client per round (every connection opened in the burst)")
    p.add_argument("--single", type=int, default=0,
                   help="also N alternating pairs of lone 4-token streams (default 0)")
    args = p.parse_args()
    if args.quick:
        args.model, args.streams, args.max_tokens, args.rounds = "tiny", 8, 16, 1

    from fabric import Fabric
    from fabric.client.local import start_site, stop_site

    tmp = Path(tempfile.mkdtemp(prefix="fabric-gateway-bench-"))
    model, model_dir = args.model, None
    if model == "tiny":
        from fabric.testing.tiny import build_tiny_llama

        model, model_dir = "tiny-llama", build_tiny_llama(tmp / "tiny")
    site_dir = write_site(tmp / "site", model, model_dir, args.workers, args.threads)
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    start_site(str(site_dir), timeout_s=600)
    gateway = user = None
    single: dict[str, Any] | None = None
    try:
        fab = Fabric(site=str(site_dir), on_status=None)
        fab.generate("warm up", model=model, max_tokens=2)
        port = free_port()
        gateway = start_gateway(site_dir, tmp, port)
        user = GatewayUser(f"http://127.0.0.1:{port}/v1",
                           None if args.cold else args.keepalive_s)
        # Warm both sides alike: one burst each (the gateway's pool threads, the client's
        # connections; the SDK's reader threads and its connection to the site).
        user.run(gateway_round(user.client, model, prompts(args.streams, 10**6), 2))
        sdk_round(fab, model, prompts(args.streams, 2 * 10**6), 2)
        sdk, gw = [], []
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}: SDK")
            sdk.append(sdk_round(fab, model, prompts(args.streams, 2 * r * args.streams),
                                 args.max_tokens))
            log(f"round {r + 1}/{args.rounds}: gateway")
            if args.cold:
                user.renew()
            gw.append(user.run(gateway_round(
                user.client, model, prompts(args.streams, (2 * r + 1) * args.streams),
                args.max_tokens)))
        if args.single:
            log(f"{args.single} lone streams each way")
            single = single_pairs(fab, user, model, args.single)
        fab.close()
    finally:
        if user is not None:
            user.close()
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)
        stop_site(str(site_dir), all=True)
    s, g = figures(sdk), figures(gw)
    common.emit({
        "benchmark": "gateway", "model": model, "streams": args.streams,
        "max_tokens": args.max_tokens, "rounds": args.rounds,
        "openai_connections": "new per round" if args.cold else f"kept {args.keepalive_s:g} s",
        "sdk": s, "gateway": g,
        "throughput_ratio": ratio(g["tokens_per_s"] or 0.0, s["tokens_per_s"] or 0.0),
        "ttft_median_diff_ms": round(g["ttft_ms"]["median"] - s["ttft_ms"]["median"], 1),
        "ttft_median_sdk_ms": round(median([x * 1000 for r in sdk for x in r["ttft"]]), 1),
        "admit_median_diff_ms": round(g["admit_ms"]["median"] - s["admit_ms"]["median"], 1),
        "single": single,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
