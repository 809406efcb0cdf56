"""What the fabric adds to one request on its own, on the local site: the SDK vs straight to
the server, one request at a time.

    python benchmarks/lone_request.py                 # 200 of each, tiny random Llama
    python benchmarks/lone_request.py --quick         # 20 of each

A warm model server of the tiny random Llama (its steps take ~1 ms, so what is measured is
the path, not the model) at a temporary local site with 4 request workers. Each round sends,
one after another with a short pause between:

- ``sdk_stream``: ``Fabric.stream``, time to its first chunk (the admission task at the site,
  the ticket, the submit over the client's connection, the first token);
- ``sdk_generate``: ``Fabric.generate`` of one token, the whole call;
- ``direct``: the same one-token request submitted to the server over one kept connection
  (``ServerClient``, a ticket from the site's key) and its result: the server's own share.

Reported: medians and p90 per way over every request, and what the SDK adds to ``direct``
(median minus median), in ms. Run it from two trees to compare code before and after.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from campaign_throughput import warm_server, write_site
from common import log, median

from fabric.client.local import start_site, stop_site
from fabric.sdk import Fabric
from fabric.testing.tiny import build_tiny_llama

MODEL = "tiny-llama"


def direct_call(site_dir: Path) -> Any:
    """A function sending one one-token request straight to the warm server and waiting for
    its result, over one connection kept for the whole run; and the connection (to close)."""
    from fabric.protocol import validate_request
    from fabric.serverclient import ServerClient

    dep, ticket = warm_server(site_dir, MODEL)
    client = ServerClient(dep.address, str(dep.public_key), timeout_s=60)

    def call(text: str) -> None:
        req = validate_request({"model": MODEL, "prompt": text, "sampling": {"max_tokens": 1}})
        client.submit(req, ticket)
        client.result(req.request_id, timeout_s=60)

    return call, client


def sdk_stream(fab: Fabric, text: str) -> float:
    """Seconds to the first chunk of a stream (read to its end after)."""
    t0 = time.perf_counter()
    with fab.stream(text, model=MODEL, max_tokens=4) as stream:
        next(iter(stream))
        first = time.perf_counter() - t0
        for _ in stream:
            pass
    return first


def main() -> int:
    """Run the rounds, print the JSON figure."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200, help="requests per way")
    p.add_argument("--pause-s", type=float, default=0.02, help="pause between requests")
    args = p.parse_args()
    if args.quick:
        args.requests = 20
    tmp = Path(tempfile.mkdtemp(prefix="fabric-lone-request-"))
    site_dir = write_site(tmp / "site", MODEL, build_tiny_llama(tmp / "tiny"), 4, 1)
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    start_site(str(site_dir), timeout_s=600)
    times: dict[str, list[float]] = {"sdk_stream": [], "sdk_generate": [], "direct": []}
    try:
        fab = Fabric(site=str(site_dir), on_status=None)
        fab.generate("warm up", model=MODEL, max_tokens=2)
        call, client = direct_call(site_dir)
        log(f"{args.requests} requests per way, interleaved")
        for i in range(args.requests):
            times["sdk_stream"].append(sdk_stream(fab, f"Stream {i}: the cell"))
            time.sleep(args.pause_s)
            t0 = time.perf_counter()
            fab.generate(f"Generate {i}: the cell", model=MODEL, max_tokens=1)
            times["sdk_generate"].append(time.perf_counter() - t0)
            time.sleep(args.pause_s)
            t0 = time.perf_counter()
            call(f"Direct {i}: the cell")
            times["direct"].append(time.perf_counter() - t0)
            time.sleep(args.pause_s)
        client.close()
        fab.close()
    finally:
        stop_site(str(site_dir), all=True)
    base = median(times["direct"])
    common.emit({
        "benchmark": "lone_request", "model": MODEL, "requests": args.requests,
        **{way: common.summary(xs, scale=1000, digits=2) for way, xs in times.items()},
        "added_ms": {way: round((median(xs) - base) * 1000, 2)
                     for way, xs in times.items() if way != "direct"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
