"""Prometheus metrics, read from the generation service (never from Gradio's internals).

One registry per app (so tests can run several). Counters live in the service, which every front door
goes through; the collector reads them at scrape time instead of mirroring them.
"""

from __future__ import annotations

from typing import Any, Iterable

from .service import OUTCOMES


class Metrics:
    """Request outcomes, queue depth, generation time, OOM recoveries, each job's GPU peak memory."""

    def __init__(self, service: Any) -> None:
        from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics

        disable_created_metrics()  # the *_created series only add noise to every scrape
        self.registry = CollectorRegistry()
        self.generation_seconds = Histogram(
            "zimage_generation_seconds", "Time the pipeline spent on one successful request.",
            buckets=(0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300), registry=self.registry)
        self.registry.register(_ServiceCollector(service))
        service.add_finished_listener(self._job_finished)

    def _job_finished(self, job: Any) -> None:
        if job.error is None:
            result = job.result(0)
            self.generation_seconds.observe(result.timings["generate_s"])

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for the /metrics route."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ServiceCollector:
    """Reads the service's own counters and state at scrape time."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.service.stats()
        requests = CounterMetricFamily("zimage_requests", "Generation requests by outcome, from every front door.",
                                       labels=["outcome"])
        for outcome in OUTCOMES:
            requests.add_metric([outcome], stats.outcomes.get(outcome, 0))
        yield requests
        yield CounterMetricFamily("zimage_oom_recoveries", "Out-of-memory errors recovered by a per-request step.",
                                  value=stats.oom_recoveries)
        yield CounterMetricFamily("zimage_nan_retries", "Generations retried in a safe dtype after NaN output.",
                                  value=stats.nan_retries)
        yield CounterMetricFamily("zimage_images_generated", "Images saved.", value=stats.images_generated)
        yield GaugeMetricFamily("zimage_queue_depth", "Jobs waiting for the GPU plus the one running.",
                                value=self.service.queue_depth())
        yield GaugeMetricFamily("zimage_model_ready", "1 when the model is loaded and serving.",
                                value=1 if self.service.state == "ready" else 0)
        yield GaugeMetricFamily("zimage_busy", "1 while a generation runs on the pipeline.",
                                value=1 if self.service.busy else 0)
        yield GaugeMetricFamily("zimage_gpu_peak_memory_bytes",
                                "Peak GPU memory allocated by the last successful job, measured from its start "
                                "(0 without a GPU).", value=stats.last_gpu_peak_bytes or 0)
        prompts = self.service.prompt_cache.stats()
        yield CounterMetricFamily("zimage_prompt_cache_hits", "Requests whose prompt embeddings came from the "
                                  "prompt cache (the text encoder did not run).", value=prompts.hits)
        yield CounterMetricFamily("zimage_prompt_cache_misses", "Requests that ran the text encoder (the cache "
                                  "did not hold their prompt, or it is off: --prompt-cache-mb 0).", value=prompts.misses)
        yield GaugeMetricFamily("zimage_prompt_cache_bytes", "Host RAM held by cached prompt embeddings.",
                                value=prompts.bytes)
        yield GaugeMetricFamily("zimage_gpu_allocated_memory_bytes",
                                "GPU memory still allocated after the last job (0 without a GPU); steady growth "
                                "is a leak.", value=stats.last_gpu_allocated_bytes or 0)
