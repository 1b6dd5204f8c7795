"""The server's Prometheus metrics, in a registry of its own (two apps in one process never clash)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from a text query (~10 ms) to a full pd batch on a 2-core CPU (~5 s) and a
# queue's worth of waiting (timeout 60 s).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, pending: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ragcap_http_requests", "HTTP requests answered, by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.errors = Counter("ragcap_errors", "Error answers, and failed items of multi-item requests, by type.",
                              ["type"], registry=r)
        self.latency = Histogram("ragcap_http_request_duration_seconds", "Time to answer a request, by route.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_items = Histogram("ragcap_batch_items", "Items (images, texts, queries) per model batch, by kind.",
                                     ["kind"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("ragcap_batch_duration_seconds", "Model time per batch, by kind.",
                                       ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        Gauge("ragcap_queue_items", "Items waiting or running.", registry=r).set_function(pending)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
