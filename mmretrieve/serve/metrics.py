"""Counters, gauges and histograms in the Prometheus text exposition format (version 0.0.4).

Written here rather than taken from prometheus_client: the service needs a dozen series, and
this keeps a dependency (and its process-global default registry) out of the package.
Every update takes one lock, so the event loop and worker threads can share the series.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Callable, Iterable

LabelValues = tuple[str, ...]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Request latencies from a cached thumbnail (~1 ms) to an image search on a busy CPU (seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Iterable[str], values: Iterable[str], extra: str = "") -> str:
    parts = [f'{name}="{_escape(str(value))}"' for name, value in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, registry: "Registry", name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self._lock = registry.lock
        registry.metrics.append(self)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        lines = self.header()
        for labels, value in sorted(self._values.items()):
            lines.append(f"{self.name}{_labels(self.label_names, labels)} {_number(value)}")
        return lines


class Gauge(_Metric):
    """A value set by the code, or read from a callback at scrape time."""

    kind = "gauge"

    def __init__(self, *args, read: Callable[[], dict[LabelValues, float]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._values: dict[LabelValues, float] = {}
        self._read = read

    def set(self, value: float, *labels: str) -> None:
        with self._lock:
            self._values[labels] = value

    def add(self, amount: float, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def render(self) -> list[str]:
        values = dict(self._values)
        if self._read is not None:
            values.update(self._read())
        return self.header() + [f"{self.name}{_labels(self.label_names, labels)} {_number(value)}"
                                for labels, value in sorted(values.items())]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, *args, buckets: tuple[float, ...] = LATENCY_BUCKETS, **kwargs):
        super().__init__(*args, **kwargs)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            counts = self._counts.setdefault(labels, [0] * len(self.buckets))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1  # stored per bucket; made cumulative when rendered
                    break
            self._sums[labels] = self._sums.get(labels, 0.0) + value

    def count(self, *labels: str) -> int:
        with self._lock:
            return sum(self._counts.get(labels, ()))

    def render(self) -> list[str]:
        lines = self.header()
        for labels, counts in sorted(self._counts.items()):
            running = 0
            for bound, count in zip(self.buckets, counts):
                running += count
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, labels, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, labels)} {_number(self._sums[labels])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, labels)} {running}")
        return lines


class Registry:
    def __init__(self):
        self.lock = threading.Lock()
        self.metrics: list[_Metric] = []

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(self, name, help, labels)

    def gauge(self, name: str, help: str, labels: tuple[str, ...] = (), read=None) -> Gauge:
        return Gauge(self, name, help, labels, read=read)

    def histogram(self, name: str, help: str, labels: tuple[str, ...] = (), buckets=LATENCY_BUCKETS) -> Histogram:
        return Histogram(self, name, help, labels, buckets=buckets)

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.metrics:
            if isinstance(metric, Gauge) and metric._read is not None:
                lines += metric.render()  # the callback may take the lock itself
                continue
            with self.lock:
                lines += metric.render()
        return "\n".join(lines) + "\n"


def resident_memory_bytes() -> float:
    """The process's resident set size, from /proc (Linux); 0 where there is no /proc."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0.0


class ServiceMetrics:
    """The series the service exports; routes are labelled by their template, never the raw path."""

    def __init__(self):
        self.registry = Registry()
        r = self.registry
        self.requests = r.counter("mmretrieve_http_requests_total", "HTTP requests answered.",
                                  ("route", "method", "status"))
        self.latency = r.histogram("mmretrieve_http_request_duration_seconds",
                                   "Time from request to the end of the response.", ("route",))
        self.in_flight = r.gauge("mmretrieve_http_requests_in_flight", "Requests being answered now.")
        self.searches = r.counter("mmretrieve_searches_total", "Queries searched, by query kind and index.",
                                  ("query", "index"))
        self.batch_size = r.histogram("mmretrieve_search_batch_size", "Queries embedded together in one batch.",
                                      buckets=(1, 2, 4, 8, 16, 32, 64))
        self.stage_seconds = r.histogram("mmretrieve_search_stage_seconds",
                                         "Time per batch in each stage of a search (embed, search).", ("stage",))
        self.reloads = r.counter("mmretrieve_index_reloads_total", "Newly published generations loaded.", ("index",))
        self.rejected = r.counter("mmretrieve_rejected_requests_total",
                                  "Requests refused before any work, by reason.", ("reason",))
        self.thumbnails = r.counter("mmretrieve_thumbnails_total", "Thumbnails served, from the disk cache or made.",
                                    ("result",))
        self.index_items = r.gauge("mmretrieve_index_items", "Items in the loaded generation.", ("index",))
        self.index_generation = r.gauge("mmretrieve_index_generation", "The loaded index generation.", ("index",))
        r.gauge("process_resident_memory_bytes", "Resident memory size in bytes.",
                read=lambda: {(): resident_memory_bytes()})
