"""Prometheus metrics of one server (its own registry, so two apps in one process do not collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300, 600)  # seconds: a clip to a long file


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, service):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("whisper_lora_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.latency = Histogram("whisper_lora_request_duration_seconds", "Time from request to last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.audio_seconds = Counter("whisper_lora_audio_seconds", "Seconds of audio transcribed, by model",
                                     ["model"], registry=registry)
        Gauge("whisper_lora_queue_depth", "Model work waiting for the batcher", registry=registry
              ).set_function(lambda: service.queue_depth)
        Gauge("whisper_lora_requests_in_flight", "Transcriptions admitted and not finished", registry=registry
              ).set_function(lambda: service.in_flight)
        batcher = service.batcher
        if batcher is not None:
            Gauge("whisper_lora_batches", "Batches the batcher has run", registry=registry
                  ).set_function(lambda: batcher.batches)
            Gauge("whisper_lora_batched_rows", "Rows (windows) in those batches", registry=registry
                  ).set_function(lambda: batcher.batched_rows)
        Gauge("whisper_lora_adapters_loaded", "LoRA adapters in memory", registry=registry
              ).set_function(lambda: len(service.pool.loaded_adapters))
        if hasattr(service, "collect"):  # serve --ray: what ran on which model replica
            registry.register(service)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
