"""Prometheus metrics: the text exposition format, histograms, and the routing-decision counter.

A shared leaf (standard library only): the model server keeps its request histograms here
(``fabric.engine.stats``), the site renders its ``/metrics`` with it
(``fabric.endpoint.site_metrics``), the gateway its own, and a router (the SDK's or the
gateway's choice among sites) counts its decisions with ``record_routing``.

Names: the fabric's series are ``fabric_`` plus vLLM's suffix where they mean the same
(``fabric_time_to_first_token_seconds`` is vLLM's ``vllm:time_to_first_token_seconds``),
labelled ``model_name`` as vLLM labels them. Not ``vllm:`` itself: the numbers come from
another engine (a dashboard should not mistake one for the other), and Prometheus reserves
colons for recording rules. A vLLM dashboard ports by replacing the ``vllm:`` prefix.

The format is Prometheus text exposition 0.0.4 (what ``prometheus_client`` writes, which the
fabric does not depend on): ``# HELP``/``# TYPE`` lines, then one sample a line; a histogram is
cumulative ``_bucket{le=...}`` samples ending at ``+Inf``, with ``_sum`` and ``_count``.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The ``Content-Type`` of a ``/metrics`` answer."""
PREFIX = "fabric_"

TTFT_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                                   0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
                                   640.0, 2560.0)
"""Time to first token (vLLM's buckets)."""
ITL_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                                  1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
"""Inter-token latency (vLLM's buckets)."""
E2E_BUCKETS: tuple[float, ...] = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                                  30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0,
                                  7680.0)
"""End-to-end request latency (vLLM's buckets)."""
COLD_START_BUCKETS: tuple[float, ...] = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                                         600.0, 1200.0, 1800.0, 3600.0)
"""Launch to ready of a model server: seconds on a laptop, minutes behind a batch queue."""

Kind = Literal["counter", "gauge", "histogram"]


class Histogram:
    """Cumulative-bucket histogram (not thread-safe: its owner locks)."""

    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self.counts = [0] * len(self.buckets)  # per bucket, not cumulative; +Inf is ``count``
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one observation."""
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) for every bucket, ending with +Inf."""
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            running += n
            out.append((bound, running))
        out.append((math.inf, self.count))
        return out

    def to_dict(self) -> dict[str, Any]:
        """Wire form (msgpack/JSON-able)."""
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum,
                "count": self.count}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        """Inverse of ``to_dict``."""
        h = cls(data["buckets"])
        h.counts = [int(c) for c in data["counts"]]
        h.sum, h.count = float(data["sum"]), int(data["count"])
        return h


@dataclass
class Family:
    """One metric: name, type, help text and its samples (labels -> value or histogram)."""

    name: str
    kind: Kind
    help: str
    samples: list[tuple[dict[str, str], float | Histogram]] = field(default_factory=list)

    def add(self, labels: Mapping[str, Any], value: float | Histogram) -> None:
        """Add one labelled sample."""
        self.samples.append(({k: str(v) for k, v in labels.items()}, value))


def render(families: Iterable[Family]) -> str:
    """The text exposition of ``families`` (one family per name: repeated names merge)."""
    merged: dict[str, Family] = {}
    for fam in families:
        have = merged.get(fam.name)
        if have is None:
            merged[fam.name] = Family(fam.name, fam.kind, fam.help, list(fam.samples))
        else:
            have.samples.extend(fam.samples)
    lines: list[str] = []
    for fam in merged.values():
        lines.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        for labels, value in fam.samples:
            if isinstance(value, Histogram):
                for bound, n in value.cumulative():
                    lines.append(f"{fam.name}_bucket{_labels({**labels, 'le': _num(bound)})}"
                                 f" {n}")
                lines.append(f"{fam.name}_sum{_labels(labels)} {_num(value.sum)}")
                lines.append(f"{fam.name}_count{_labels(labels)} {value.count}")
            else:
                lines.append(f"{fam.name}{_labels(labels)} {_num(float(value))}")
    return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if value != int(value) or abs(value) >= 1e15 else str(int(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_value(v)}"' for k, v in labels.items()) + "}"


class LabelledCounter:
    """A process-wide counter with fixed label names (thread-safe)."""

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...]) -> None:
        self.name, self.help, self.labelnames = name, help, labelnames
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        """Add ``amount`` (>= 0) to the series ``labels`` names (exactly ``labelnames``)."""
        if amount < 0:
            raise ValueError("a counter only goes up")
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        key = tuple(str(labels[n]) for n in self.labelnames)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: Any) -> float:
        """The current value of one series (0 if never incremented)."""
        key = tuple(str(labels[n]) for n in self.labelnames)
        with self._lock:
            return self._values.get(key, 0.0)

    def family(self) -> Family:
        """Its samples now."""
        fam = Family(self.name, "counter", self.help)
        with self._lock:
            items = list(self._values.items())
        for key, value in items:
            fam.add(dict(zip(self.labelnames, key, strict=True)), value)
        return fam

    def clear(self) -> None:
        """Forget every series (tests)."""
        with self._lock:
            self._values.clear()


ROUTING_DECISIONS = LabelledCounter(
    PREFIX + "routing_decisions_total",
    "Requests a router sent to a site, by model, chosen site and why it was chosen "
    "(warm, queued, cold, failover, ...).", ("model_name", "site", "reason"))
"""Incremented by whatever chooses a site for a request (``record_routing``); rendered by the
gateway's ``/metrics`` (the process where routing happens)."""


def record_routing(model: str, site: str, reason: str) -> None:
    """Count one routing decision: ``model`` sent to ``site`` because ``reason`` (a short
    fixed word such as ``warm``, ``queued``, ``cold``, ``failover``: it is a label, so never
    a free-form message)."""
    ROUTING_DECISIONS.inc(model_name=model, site=site, reason=reason)
