"""The server's Prometheus metrics, in a registry of its own (several apps in one process do not clash)."""

from __future__ import annotations

import resource

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

#: Seconds buckets for latencies, from a tiny CPU model's batch to a queue of SDXL images.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300)


class Metrics:
    def __init__(self, max_batch: int):
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, CPU seconds, open files
        self.queue_images = Gauge("diffjet_queue_images", "Images waiting for a batch", registry=registry)
        self.batch_images = Histogram("diffjet_batch_images", "Images per pipeline call",
                                      buckets=tuple(range(1, max_batch + 1)), registry=registry)
        self.batch_seconds = Histogram("diffjet_batch_seconds", "Seconds per pipeline call",
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_seconds = Histogram("diffjet_queue_seconds", "Seconds an image waited before its batch ran",
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self.request_seconds = Histogram("diffjet_request_seconds", "Seconds from request to response, by route",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.requests = Counter("diffjet_requests", "Requests answered, by route and status code",
                                ["route", "status"], registry=registry)
        self.images = Counter("diffjet_images", "Images generated and delivered", registry=registry)
        self.errors = Counter("diffjet_errors", "Pipeline calls that failed", registry=registry)
        self.dropped = Counter("diffjet_dropped_images", "Queued images dropped before their batch ran, by reason",
                               ["reason"], registry=registry)
        self.lora_switches = Counter("diffjet_lora_switches", "Changes of the merged LoRA set", registry=registry)
        self.memory = Gauge("diffjet_memory_bytes", "Memory after the last batch: host_peak (peak resident set "
                            "size), cuda (allocated), cuda_reserved (held by the caching allocator), cuda_peak (peak allocated)", ["kind"], registry=registry)

    def record_memory(self, device: str) -> None:
        """Host peak RSS and, on CUDA, allocated and peak allocated bytes."""
        self.memory.labels("host_peak").set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        if device.startswith("cuda"):
            import torch

            self.memory.labels("cuda").set(torch.cuda.memory_allocated())
            self.memory.labels("cuda_reserved").set(torch.cuda.memory_reserved())
            self.memory.labels("cuda_peak").set(torch.cuda.max_memory_allocated())

    def text(self) -> bytes:
        return generate_latest(self.registry)
