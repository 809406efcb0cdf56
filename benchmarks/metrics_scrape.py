"""Cost of the site's Prometheus ``/metrics`` (issue 18).

A temporary local site serving SmolLM2-135M with ``metrics.enabled``: (1) how long one scrape
takes with one warm model server (deployment records, the server's ``stats`` call, the events
database), and its size; (2) what scraping costs requests: ``fab.generate`` latency with a
scraper hitting ``/metrics`` at ``--scrape-hz`` alongside vs with none, in alternating blocks of
``--block`` calls, ``--rounds`` rounds (headline: median of the rounds' median ratios).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import common
import httpx
import yaml
from common import log, median, ratio, summary


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--scrapes", type=int, default=50)
    p.add_argument("--calls", type=int, default=40, help="requests per path per round")
    p.add_argument("--block", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--scrape-hz", type=float, default=10.0)
    args = p.parse_args()
    if args.quick:
        args.scrapes, args.calls, args.block, args.rounds = 5, 4, 2, 1
    site = common.TempSite(workers=2)
    cfg = yaml.safe_load((site.folder / "fabric.yaml").read_text())
    cfg["metrics"] = {"enabled": True, "port": 0}
    (site.folder / "fabric.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with site:
        info = json.loads((site.state_dir / "metrics.json").read_text()) \
            if _wait_file(site.state_dir / "metrics.json") else {}
        url = info["url"]
        fab = site.fabric()
        fab.generate("warm up", model=common.SMOLLM, max_tokens=2)
        scrape_s, size = [], 0
        with httpx.Client(timeout=10) as http:
            for _ in range(args.scrapes):
                t0 = time.perf_counter()
                body = http.get(url).text
                scrape_s.append(time.perf_counter() - t0)
                size = len(body)
        log(f"scrape median {median(scrape_s) * 1e3:.1f} ms, {size} bytes")
        rounds = [_round(fab, url, args) for _ in range(args.rounds)]
        fab.close()
    ratios = [r["ratio"] for r in rounds]
    common.emit({"benchmark": "metrics_scrape", "model": common.SMOLLM,
                 "scrape_ms": summary(scrape_s, 1e3, 2), "scrape_bytes": size,
                 "request_ms_ratio_scraped_vs_not": median(ratios), "rounds": rounds,
                 "settings": vars(args)})


def _wait_file(path: Any, timeout_s: float = 60.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if path.exists():
            return True
        time.sleep(0.1)
    return False


def _round(fab: Any, url: str, args: Any) -> dict[str, Any]:
    times: dict[str, list[float]] = {"scraped": [], "plain": []}
    for _ in range(args.calls // args.block):
        for path in ("scraped", "plain"):
            stop = threading.Event()
            scraper = threading.Thread(target=_scrape, args=(url, args.scrape_hz, stop))
            if path == "scraped":
                scraper.start()
            for _ in range(args.block):
                t0 = time.perf_counter()
                fab.generate("The mitochondria is", model=common.SMOLLM,
                             max_tokens=args.max_tokens)
                times[path].append(time.perf_counter() - t0)
            stop.set()
            if path == "scraped":
                scraper.join(10)
    scraped, plain = median(times["scraped"]), median(times["plain"])
    log(f"request median scraped {scraped * 1e3:.1f} ms, plain {plain * 1e3:.1f} ms")
    return {"scraped_ms": summary(times["scraped"], 1e3, 2),
            "plain_ms": summary(times["plain"], 1e3, 2), "ratio": ratio(scraped, plain)}


def _scrape(url: str, hz: float, stop: threading.Event) -> None:
    with httpx.Client(timeout=10) as http:
        while not stop.wait(1.0 / hz):
            http.get(url)


if __name__ == "__main__":
    main()
