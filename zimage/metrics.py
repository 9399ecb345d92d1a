"""Prometheus metrics for the web app, on a registry of its own (one per app, so tests can run several)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

#: Outcomes counted in ``zimage_requests_total``.
OUTCOMES = ("ok", "invalid", "busy", "cancelled", "failed", "not_ready")


class Metrics:
    """Request outcomes, queue depth, generation time, OOM recoveries, GPU peak memory."""

    def __init__(self, service: Any, queue_depth: Callable[[], int]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # the *_created series only add noise to every scrape
        self.registry = CollectorRegistry()
        self.requests = Counter("zimage_requests", "Generation requests by outcome.", ["outcome"],
                                registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # export zeros, so rates work from the first scrape
        self.generation_seconds = Histogram(
            "zimage_generation_seconds", "Time the pipeline spent on one successful request.",
            buckets=(0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300), registry=self.registry)
        self.queue_depth = Gauge("zimage_queue_depth", "Jobs waiting for the GPU plus the one running.",
                                 registry=self.registry)
        self.queue_depth.set_function(queue_depth)
        self.gpu_peak_bytes = Gauge("zimage_gpu_peak_memory_bytes",
                                    "Peak GPU memory allocated by the last generation (0 without a GPU).",
                                    registry=self.registry)
        self.gpu_allocated_bytes = Gauge("zimage_gpu_allocated_memory_bytes",
                                         "GPU memory still allocated after the last generation (0 without a "
                                         "GPU); steady growth is a leak.", registry=self.registry)
        self.registry.register(_ServiceCollector(service))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for the /metrics route."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ServiceCollector:
    """Reads the service's own counters at scrape time instead of mirroring them."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.service.stats()
        yield CounterMetricFamily("zimage_oom_recoveries", "Out-of-memory errors recovered by stepping down.",
                                  value=stats.oom_recoveries)
        yield CounterMetricFamily("zimage_nan_retries", "Generations retried in a safe dtype after NaN output.",
                                  value=stats.nan_retries)
        yield CounterMetricFamily("zimage_images_generated", "Images saved.", value=stats.images_generated)
        yield GaugeMetricFamily("zimage_model_ready", "1 when the model is loaded and serving.",
                                value=1 if self.service.state == "ready" else 0)
        yield GaugeMetricFamily("zimage_busy", "1 while a generation runs on the pipeline.",
                                value=1 if self.service.busy else 0)
