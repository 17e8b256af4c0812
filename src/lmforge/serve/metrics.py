"""Prometheus text-format metrics of the server: counters, gauges and latency histograms, thread-safe.

Written by hand (a few dozen lines) rather than with prometheus_client: the server needs only these three
kinds, and the text format is simple and stable.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters (`inc`), gauges (`set`) and histograms (`observe`), rendered by `render()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._gauges: dict[str, float] = {}
        self._hist: dict[str, list[float]] = {}  # name -> per-bucket counts, then sum, then count
        self._help: dict[str, tuple[str, str]] = {}

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._counters[(name, tuple(sorted(labels.items())))] += value

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = value

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            h = self._hist.setdefault(name, [0.0] * (len(LATENCY_BUCKETS) + 2))
            bucket = bisect.bisect_left(LATENCY_BUCKETS, seconds)  # the first bound >= seconds
            if bucket < len(LATENCY_BUCKETS):
                h[bucket] += 1
            h[-2] += seconds
            h[-1] += 1

    def render(self) -> str:
        """The Prometheus exposition text of every metric."""
        lines: list[str] = []
        with self._lock:
            names = sorted({n for n, _ in self._counters} | set(self._gauges) | set(self._hist) | set(self._help))
            for name in names:
                kind, text = self._help.get(name, ("untyped", name))
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                for (n, labels), value in sorted(self._counters.items()):
                    if n == name:
                        tags = ",".join(f'{k}="{v}"' for k, v in labels)
                        lines.append(f"{name}{{{tags}}} {value:g}" if tags else f"{name} {value:g}")
                if name in self._gauges:
                    lines.append(f"{name} {self._gauges[name]:g}")
                if name in self._hist:
                    h = self._hist[name]
                    running = 0.0
                    for bound, count in zip(LATENCY_BUCKETS, h, strict=False):
                        running += count
                        lines.append(f'{name}_bucket{{le="{bound:g}"}} {running:g}')
                    lines += [f'{name}_bucket{{le="+Inf"}} {h[-1]:g}', f"{name}_sum {h[-2]:.6f}",
                              f"{name}_count {h[-1]:g}"]
        return "\n".join(lines) + "\n"
