"""32 users at once, each in a process of its own: streams through ``fabric serve`` with the
``openai`` client vs the same streams through the SDK, on one warm model server. Prints JSON.

    python benchmarks/gateway_users.py                # SmolLM2, 32 users, 16 tokens each
    python benchmarks/gateway_users.py --quick        # tiny model, 4 users, to check it runs

``benchmarks/gateway.py`` sends its 32 streams from one client process: one ``openai`` client
and one ``Fabric``, under one GIL. That measures a script that fans out, and there the
``openai`` client's own ~3 ms of CPU per streamed call is paid 32 times in a row before the
last stream is even sent (``gateway_floor.py``). Here each user is a process that holds one
``Fabric`` and one ``openai`` client for the whole run, as 32 scientists' notebooks or 32
agents would: every user's calls are its own, and a burst is every user calling at once
(released by one barrier). Each user's SDK admits its own request (no coalescing with the
others: they are other processes); the gateway is one process that serves them all.

Rounds alternate: all users through the SDK, then all through the gateway, or the other way
round (the order flips each round; ``--rounds``), and ``alternating_paired`` pairs each
round's two bursts, which ran back to back;
``--together N`` adds N rounds in which half the users call through each side in one burst
(the sides alternate by user, and which half starts flips each round), so both halves meet the
same server steps. Figures as ``gateway.py``'s: ``throughput_ratio`` (gateway / SDK tokens/s)
and the median time to first token (TTFT, from each user's call to its first text) per side,
and their difference. Times are ``time.perf_counter`` in each user's process, which on Linux
is the system-wide monotonic clock, so a user's end and the burst's start compare.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import common
from campaign_throughput import write_site
from common import log, ratio
from gateway import (
    Clock,
    figures,
    free_port,
    prompts,
    start_gateway,
    stop_everything,
    together_figures,
)


def user(conn: Connection, barrier: Any, site_dir: str, model: str, base_url: str) -> None:
    """One user's process: one ``Fabric`` and one ``openai`` client, held for the whole run.
    Each job (side, prompt, max_tokens) waits for the burst's barrier, runs one stream and
    sends back its ``Timing`` as a tuple; None ends the process."""
    import openai

    from fabric import Fabric

    fab = Fabric(site=site_dir, on_status=None)
    client = openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=600)
    conn.send("ready")
    while (job := conn.recv()) is not None:
        side, text, max_tokens = job
        barrier.wait()
        clock = Clock()
        if side == "sdk":
            with fab.stream(text, model=model, max_tokens=max_tokens) as stream:
                clock.admitted()
                for chunk in stream:
                    clock.text(chunk)
            conn.send(tuple(clock.timing(len(stream.token_ids))))
        else:
            chunks = client.completions.create(
                model=model, prompt=text, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True})
            clock.admitted()
            for piece in chunks:
                clock.openai(piece)
            conn.send(tuple(clock.timing()))
    client.close()
    fab.close()


class Users:
    """The user processes and the barrier that starts each burst."""

    def __init__(self, n: int, site_dir: Path, model: str, base_url: str) -> None:
        ctx = mp.get_context("spawn")  # no forked zmq contexts or threads
        self.barrier = ctx.Barrier(n + 1)
        self.conns: list[Connection] = []
        self.procs = []
        for _ in range(n):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=user, args=(theirs, self.barrier, str(site_dir), model,
                                                  base_url), daemon=True)
            proc.start()
            self.conns.append(mine)
            self.procs.append(proc)
        for conn in self.conns:
            if not conn.poll(300) or conn.recv() != "ready":
                raise RuntimeError("a user process did not start within 300 s")

    def burst(self, sides: list[str], texts: list[str], max_tokens: int
              ) -> dict[str, dict[str, Any]]:
        """User i calls through ``sides[i]`` with ``texts[i]``, all at once; one round's
        figures per side (as ``gateway.burst``'s)."""
        for conn, side, text in zip(self.conns, sides, texts, strict=True):
            conn.send((side, text, max_tokens))
        self.barrier.wait(300)
        t0 = time.perf_counter()
        timings = []
        for conn in self.conns:
            if not conn.poll(900):
                raise RuntimeError("a user's stream did not end within 900 s")
            timings.append(conn.recv())
        rounds = {}
        for side in dict.fromkeys(sides):
            part = [t for s, t in zip(sides, timings, strict=True) if s == side]
            rounds[side] = {"seconds": max(t[3] for t in part) - t0,
                            "tokens": sum(t[2] for t in part), "ttft": [t[0] for t in part],
                            "admit": [t[1] for t in part], "wire": [t[4] for t in part]}
        return rounds

    def close(self) -> None:
        """End every user process."""
        for conn in self.conns:
            with contextlib.suppress(OSError):  # that user is gone already
                conn.send(None)
        for proc in self.procs:
            proc.join(20)
            if proc.is_alive():
                proc.kill()


def main() -> int:
    """Run both sides from the user processes and print the JSON figure."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="catalog model, or 'tiny'")
    p.add_argument("--users", type=int, default=32, help="user processes (default 32)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4, help="rounds per side, alternating")
    p.add_argument("--together", type=int, default=0,
                   help="also N rounds with half the users through each side in one burst")
    p.add_argument("--workers", type=int, default=4, help="request workers at the site")
    p.add_argument("--threads", type=int, default=1, help="OMP threads of the server")
    args = p.parse_args()
    if args.quick:
        args.model, args.users, args.max_tokens, args.rounds, args.together = "tiny", 4, 8, 1, 2

    from fabric import Fabric
    from fabric.client.local import start_site

    tmp = Path(tempfile.mkdtemp(prefix="fabric-gateway-users-"))
    model, model_dir = args.model, None
    if model == "tiny":
        from fabric.testing.tiny import build_tiny_llama

        model, model_dir = "tiny-llama", build_tiny_llama(tmp / "tiny")
    site_dir = write_site(tmp / "site", model, model_dir, args.workers, args.threads, {})
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    start_site(str(site_dir), timeout_s=600)
    gateway = users = None
    n = args.users
    try:
        with Fabric(site=str(site_dir), on_status=None) as fab:
            fab.generate("warm up", model=model, max_tokens=2)
        port = free_port()
        gateway = start_gateway(site_dir, tmp, port)
        log(f"starting {n} user processes")
        users = Users(n, site_dir, model, f"http://127.0.0.1:{port}/v1")
        # Warm both sides alike: each user's connection to the site and to the gateway.
        users.burst(["gateway"] * n, prompts(n, 10**6), 2)
        users.burst(["sdk"] * n, prompts(n, 2 * 10**6), 2)
        sdk, gw, mixed = [], [], []
        for r in range(args.rounds):
            # Which side goes first flips each round: a round's machine state (the usage
            # collection after a burst, the page cache) then favours neither side.
            order = ["sdk", "gateway"] if r % 2 == 0 else ["gateway", "sdk"]
            log(f"round {r + 1}/{args.rounds}: {order[0]}, then {order[1]}")
            for k, side in enumerate(order):
                got = users.burst([side] * n, prompts(n, (2 * r + k) * n), args.max_tokens)
                (sdk if side == "sdk" else gw).append(got[side])
        for r in range(args.together):
            log(f"together {r + 1}/{args.together}: {n // 2} users each way")
            order = ["sdk", "gateway"] if r % 2 == 0 else ["gateway", "sdk"]
            both = users.burst([order[i % 2] for i in range(n)], prompts(n, 10**5 + r * n),
                               args.max_tokens)
            mixed.append((both["sdk"], both["gateway"]))
    finally:
        if users is not None:
            users.close()
        stop_everything(gateway, site_dir)
    s, g = figures(sdk), figures(gw)
    common.emit({
        "benchmark": "gateway_users", "model": model, "users": n,
        "max_tokens": args.max_tokens, "rounds": args.rounds,
        "client": "a process per user: one Fabric, one openai.OpenAI, kept for the run",
        "sdk": s, "gateway": g,
        "throughput_ratio": ratio(g["tokens_per_s"] or 0.0, s["tokens_per_s"] or 0.0),
        "ttft_median_diff_ms": round(g["ttft_ms"]["median"] - s["ttft_ms"]["median"], 1),
        "ttft_median_diff_ms_95": common.bootstrap_diff(
            [[x * 1000 for x in r["ttft"]] for r in sdk],
            [[x * 1000 for x in r["ttft"]] for r in gw]),
        "admit_median_diff_ms": round(g["admit_ms"]["median"] - s["admit_ms"]["median"], 1),
        # Round r's two bursts ran back to back: paired, as the together rounds are.
        "alternating_paired": together_figures(list(zip(sdk, gw, strict=True))),
        "together": together_figures(mixed) if mixed else None,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
