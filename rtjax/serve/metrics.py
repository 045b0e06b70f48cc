"""The Prometheus metrics a person running a model server expects, in one
registry per server (so several servers, or tests, can live in a process):
requests and batches, and for text generation the time to first token, per
output token and in the queue, slots in use and the KV cache's fill."""

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
    self.ttft = Histogram(
        "rtjax_time_to_first_token_seconds", "Generation: arrival to the "
        "first token (queueing included).", ["model"],
        buckets=LATENCY_BUCKETS, registry=r)
    self.tpot = Histogram(
        "rtjax_time_per_output_token_seconds", "Generation: (last token - "
        "first token) / (tokens - 1) per request, as MLPerf.", ["model"],
        buckets=LATENCY_BUCKETS, registry=r)
    self.queue_seconds = Histogram(
        "rtjax_generation_queue_seconds", "Generation: arrival to the start "
        "of its prefill.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
    self.slots_in_use = Gauge(
        "rtjax_slots_in_use", "Generation: slots holding a request.",
        ["model"], registry=r)
    self.kv_cache_fill = Gauge(
        "rtjax_kv_cache_fill", "Generation: positions the active slots hold "
        "over all the slots' positions.", ["model"], registry=r)
    self.rejected = Counter(
        "rtjax_rejected_requests", "Requests refused (deadline, queue_full, "
        "stopping, not_ready), malformed (bad_request, too_large) or left "
        "by their client while sending (client_disconnected).",
        ["model", "reason"], registry=r)

  def generation_observer(self, model: str):
    """What a scheduler calls with each stream that ends."""
    ttft, tpot = self.ttft.labels(model), self.tpot.labels(model)
    queue = self.queue_seconds.labels(model)
    def observe(stream):
      done = stream.completion
      if done.token_times:
        ttft.observe(done.ttft_s)
        queue.observe(stream.prefilled_at - stream.admitted)
      if len(done.token_times) > 1:
        tpot.observe(done.tpot_s)
    return observe

  def watch_scheduler(self, model: str, scheduler) -> None:
    self.slots_in_use.labels(model).set_function(
        lambda: scheduler.slots_in_use)
    self.kv_cache_fill.labels(model).set_function(
        lambda: scheduler.cache_fill)
    self.queue_rows.labels(model).set_function(lambda: scheduler.queued)

  def exposition(self) -> tuple[bytes, str]:
    return generate_latest(self.registry), CONTENT_TYPE_LATEST
