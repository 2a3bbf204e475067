"""/metrics over all workers: prometheus_client's multiprocess mode.

`serve --workers N` gives every worker the same `PROMETHEUS_MULTIPROC_DIR` (a fresh directory per
run). prometheus_client instruments (Counter, Histogram, Gauge with a `multiprocess_mode`) then
keep their values in per-process files there, and whichever worker answers a scrape reads them all
through `MultiProcessCollector`: counters and histograms are sums over every worker, the ones that
died and were restarted included. Metrics that are not prometheus_client instruments (collectors
that compute values in-process at scrape time) are added as they are with a `worker` label, since
only the worker that answers can see them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_ENV = "GUARDGATE_WORKER"  # the worker's index, set by the supervisor


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class _WorkerLabelled:
    """Another collector's families, each sample labelled with this worker's index."""

    def __init__(self, collector: Any, worker: str) -> None:
        self.collector = collector
        self.worker = worker

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        for family in self.collector.collect():
            family.samples = [
                Sample(s.name, {**s.labels, "worker": self.worker}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            ]
            yield family


def exposition_registry(local: CollectorRegistry) -> CollectorRegistry:
    """What /metrics renders: `local` alone, or in multiprocess mode the sums over all workers."""
    path = multiprocess_dir()
    if path is None:
        return local
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=path)
    worker = os.environ.get(WORKER_ENV, str(os.getpid()))
    for collector in list(local._collector_to_names):  # the registry has no public list
        if not isinstance(collector, MetricWrapperBase):  # instruments are in the multiprocess files
            registry.register(_WorkerLabelled(collector, worker))
    return registry


def mark_dead(pid: int) -> None:
    """Drop a dead worker's live-gauge files (its counters stay in the sums)."""
    path = multiprocess_dir()
    if path is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)
