"""The Prometheus metrics a person running a model server expects, in one
registry per server (so several servers, or tests, can live in a process)."""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:

  def __init__(self):
    self.registry = CollectorRegistry()
    r = self.registry
    self.requests = Counter(
        "rtjax_requests", "Infer requests answered, by HTTP status.",
        ["model", "code"], registry=r)
    self.latency = Histogram(
        "rtjax_request_latency_seconds", "Infer request latency, from the "
        "body read to the response (admitted and answered requests).",
        ["model"], buckets=LATENCY_BUCKETS, registry=r)
    self.batch_rows = Histogram(
        "rtjax_batch_rows", "Rows of requests per executed batch.",
        ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        registry=r)
    self.batch_seconds = Histogram(
        "rtjax_batch_seconds", "Model time per executed batch.", ["model"],
        buckets=LATENCY_BUCKETS, registry=r)
    self.queue_rows = Gauge(
        "rtjax_queue_rows", "Rows waiting for a batch.", ["model"], registry=r)
    self.in_flight = Gauge(
        "rtjax_requests_in_flight", "Infer requests admitted and not yet "
        "answered.", ["model"], registry=r)
    self.rejected = Counter(
        "rtjax_rejected_requests", "Requests refused (deadline, queue_full, "
        "stopping, not_ready), malformed (bad_request, too_large) or left "
        "by their client while sending (client_disconnected).",
        ["model", "reason"], registry=r)

  def exposition(self) -> tuple[bytes, str]:
    return generate_latest(self.registry), CONTENT_TYPE_LATEST
