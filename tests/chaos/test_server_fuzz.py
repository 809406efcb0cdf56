"""Seeded fuzzers against a real tiny-model server: the wire (malformed and mutated messages
from a peer with only the public key) and requests (schema-shaped but hostile, sent with a
valid ticket). Each prints its counts; crashes and untyped errors must be zero, and the server
must still answer a valid request correctly afterwards."""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest

from fabric.errors import _REGISTRY
from fabric.protocol import pack
from tests.chaos.server_raw import RawPeer, still_serves
from tests.plugins.servers import ServerHandle

pytestmark = pytest.mark.slow
UNTYPED = {"FabricError", "ServerInternalError"}
"""Error kinds that mean the server did not foresee the input."""
ODD = ["", " ", "\x00", "é", "\u202e", "\u200b", "🧬" * 50, "a\u0301" * 30, "\ud800",
       "\uffff", "x" * 5000, "<|im_start|>", "{{ raise }}", "\n" * 100]


@pytest.fixture(scope="module")
def server(model_server: Any, tiny_llama_dir: Path) -> ServerHandle:
    return model_server(tiny_llama_dir, name="tiny_llama", max_running=4)


def _value(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack-able value."""
    pick = rng.randrange(10 if depth < 3 else 7)
    return [lambda: None, lambda: rng.random() < 0.5, lambda: rng.randint(-2**63, 2**64 - 1),
            lambda: rng.choice([0.0, -1.0, 1e308, float("nan"), float("inf"), 1e-50]),
            lambda: rng.choice([*ODD[:8], "submit", "poll", "health"]),
            lambda: rng.randbytes(rng.randrange(40)),
            lambda: rng.choice(["*", "x", "op", "request"]),
            lambda: [_value(rng, depth + 1) for _ in range(rng.randrange(4))],
            lambda: {_key(rng): _value(rng, depth + 1) for _ in range(rng.randrange(5))},
            lambda: {"op": rng.choice(["submit", "poll", "cancel", "health", "drain"])},
            ][pick]()


def _key(rng: random.Random) -> Any:
    return rng.choice(["op", "ticket", "request", "request_id", "cursor", "wait", "stream",
                       "detach", "model", "prompt", 1, b"op", "\u00e9"])


def _bad_ticket(rng: random.Random, good: str) -> Any:
    raw, sig = good.rsplit(".", 1)
    return rng.choice([
        f"{raw}.{sig[:-1]}{'0' if sig[-1] != '0' else '1'}", f"{raw}.é{sig[1:]}", raw, "",
        f"{raw[:-4]}.{sig}", good + "x", "." * 5, rng.randbytes(20), 12345, None,
        f"{raw}.{sig}".upper(), "a" * 9000])


def _wire_message(rng: random.Random, server: ServerHandle) -> list[bytes]:
    """One fuzzed multipart message (frames after the identity)."""
    shape = rng.randrange(6)
    templates = [
        {"op": "submit", "ticket": server.ticket,
         "request": {"model": server.name, "prompt": "hi"}},
        {"op": "poll", "ticket": server.ticket, "request_id": "r", "cursor": 0, "wait": 0},
        {"op": "cancel", "ticket": server.ticket, "request_id": "r"},
        {"op": "health"}, {"op": "drain", "ticket": server.ticket}]
    if shape == 0:
        return [rng.randbytes(rng.randrange(64)) for _ in range(rng.choice([2, 3, 4]))]
    if shape == 1:
        return [rng.randbytes(rng.randrange(200))]
    if shape == 2:
        return [msgpack.packb(_value(rng), use_bin_type=True)]
    msg = dict(rng.choice(templates))
    if shape == 3:  # one field of the right name holds a wrong value
        msg[rng.choice([*msg, _key(rng)])] = _value(rng)
    if "ticket" in msg and (shape == 4 or msg["op"] == "submit"):
        msg["ticket"] = _bad_ticket(rng, server.ticket)  # never let a fuzzed submit run
    if shape == 5:
        msg[_key(rng)] = _value(rng)
    frame = msgpack.packb(msg, use_bin_type=True)
    if rng.random() < 0.1:  # truncated or bit-flipped
        cut = bytearray(frame[:rng.randrange(1, len(frame) + 1)])
        cut[rng.randrange(len(cut))] ^= 1 << rng.randrange(8)
        frame = bytes(cut)
    return [frame]


def _classify(reply: dict[str, Any] | None, counts: Counter[str]) -> None:
    if reply is None:
        counts["unanswered"] += 1
    elif reply.get("op") != "error":
        counts["answered"] += 1
    else:
        kind = str((reply.get("error") or {}).get("kind"))
        counts["untyped" if kind in UNTYPED or kind not in _REGISTRY else "typed"] += 1


def _report(name: str, counts: Counter[str], server: ServerHandle, started: float) -> None:
    try:
        still_serves(server)
        crashes = 0
    except Exception as exc:  # the server no longer serves: that is the crash we count
        print(f"server does not serve after {name}: {exc!r}")
        crashes = 1
    counts["crashes"] = crashes + (0 if server.alive() else 1)
    print(f"{name}: {dict(counts)} in {time.monotonic() - started:.1f} s")
    assert counts["crashes"] == 0 and counts["untyped"] == 0 and counts["unanswered"] == 0, \
        dict(counts)


def test_wire_fuzzer(server: ServerHandle) -> None:
    rng, counts, started = random.Random(20261202), Counter[str](), time.monotonic()
    peer = RawPeer(server)
    for _ in range(10_000):
        if time.monotonic() - started > 60:
            break
        peer.send_frames(_wire_message(rng, server))
        counts["inputs"] += 1
        _classify(peer.recv(10), counts)
    peer.close()
    big = RawPeer(server)  # one oversize message: dropped unread, no reply
    big.send_frames([b"\x81" + b"x" * (65 << 20)])
    counts["inputs"] += 1
    counts["oversize_dropped"] += big.recv(3) is None
    big.close()
    assert counts["inputs"] >= 1000
    _report("wire fuzzer", counts, server, started)


def _request(rng: random.Random, server: ServerHandle) -> dict[str, Any]:
    """A schema-shaped request with hostile values."""
    def text() -> str:
        return rng.choice(ODD) if rng.random() < 0.6 else "The cell " * rng.randrange(1, 40)

    req: dict[str, Any] = {"request_id": uuid.uuid4().hex, "model": server.name,
                           "kind": rng.choice(["generate"] * 4 + ["embed", "hidden_states",
                                                                  "logprobs", "chat"])}
    if rng.random() < 0.2:
        req["messages"] = [{rng.choice(["role", "role", "rol", "content"]):
                            rng.choice(["user", "system", "assistant", "tool", "", 3]),
                            "content": rng.choice([text(), 5, None])}
                           for _ in range(rng.randrange(0, 4))]
    else:
        req["prompt"] = text()
    if rng.random() < 0.1:
        req["prompts"] = [text() for _ in range(rng.choice([0, 1, 3, 5000]))]
    sampling = {"max_tokens": rng.choice([1, 2, 3, 0, -1, 10**9, 2**63 - 1]),
                "temperature": rng.choice([0.0, 0.7, 1e-50, 1e-3, 100.0, 1e300, -1.0]),
                "top_p": rng.choice([1.0, 0.5, 1e-30, 0.0, 2.0]),
                "top_k": rng.choice([0, 1, 5, 10**9, -3]),
                "seed": rng.choice([None, 0, -(2**63), 2**63 - 1, 2**64 - 1]),
                "stop": rng.choice([[], ["."], [""], ["\x00"] * 3, ["a"] * 100]),
                "logprobs": rng.random() < 0.3}
    req["sampling"] = {k: v for k, v in sampling.items() if rng.random() < 0.7}
    if rng.random() < 0.3:
        req["hooks"] = [{"kind": rng.choice(["steer", "capture", "ablate_heads",
                                             "ablate_neurons", "boom"]),
                         "layer": rng.choice([0, 3, -1, 4, -5, 2**40]),
                         "vector": [rng.choice([0.1, 1e5, 1e30, -1.0])] * rng.choice([64, 1, 0]),
                         "scale": rng.choice([1.0, 1e6, -1e10]),
                         "heads": rng.sample(range(-2, 6), rng.randrange(3)),
                         "neurons": rng.sample(range(-2, 300), rng.randrange(3))}
                        for _ in range(rng.choice([1, 2, 20]))]
    for key, choices in (("layers", [[-1], [0, 4], [99], list(range(2000))]),
                         ("positions", [None, [0], [-1, 0], [10**6]]),
                         ("timeout", [None, 1e-9, 30.0, -1.0]), ("pooling", ["mean", "max"])):
        if rng.random() < 0.2:
            req[key] = rng.choice(choices)
    return req


def test_request_fuzzer(server: ServerHandle) -> None:
    rng, counts, started = random.Random(4242), Counter[str](), time.monotonic()
    peer = RawPeer(server)
    for _ in range(4000):
        if time.monotonic() - started > 60:
            break
        req = _request(rng, server)
        frame = msgpack.packb({"op": "submit", "ticket": server.ticket, "request": req},
                              use_bin_type=True, unicode_errors="surrogatepass")
        peer.send_frames([frame])
        counts["inputs"] += 1
        reply = peer.recv(30)
        while reply is not None and reply.get("op") in ("accepted", "event"):
            counts["accepted"] += reply["op"] == "accepted"
            reply = peer.recv(60)
        _classify(reply, counts)
    peer.close()
    assert counts["inputs"] >= 300 and counts["accepted"] > 0 and counts["typed"] > 0
    _report("request fuzzer", counts, server, started)
    assert pack({"ok": True})  # the wire still encodes (sanity)
