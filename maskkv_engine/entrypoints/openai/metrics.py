"""Prometheus metrics for /metrics: queue and page gauges read at scrape time, step and request histograms.

Each server owns its own registry, so several servers (tests, Ray Serve replicas sharing a process)
never collide in prometheus_client's global one.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from maskkv_engine.engine.async_llm_engine import AsyncLLMEngine, StepStats
from maskkv_engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

STEP_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TOKENS_PER_SECOND_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _EngineStateCollector(Collector):
    """Values that are state, not events: read from the engine when Prometheus scrapes."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        labels = ["model_name"]
        value = [self.model_name]
        bm = self.engine.engine.block_manager
        gauges = [
            ("maskkv_num_requests_running", "Requests in the running batch.", self.engine.num_running),
            ("maskkv_num_requests_waiting", "Requests waiting for admission.", self.engine.num_waiting),
            ("maskkv_kv_pages_used", "KV pages owned by live requests.", bm.num_used_pages if bm else 0),
            ("maskkv_kv_pages_free", "KV pages neither owned nor reserved.", bm.num_free_pages if bm else 0),
            (
                "maskkv_kv_pages_reserved",
                "KV pages reserved by admitted requests, not yet written.",
                bm.num_reserved_pages if bm else 0,
            ),  # fmt: skip
            ("maskkv_kv_pages_total", "KV pages in the pool.", bm.num_pages if bm else 0),
            ("maskkv_kv_bytes_used", "Bytes of KV pages owned by live requests.", bm.used_bytes if bm else 0),
            ("maskkv_kv_bytes_total", "Bytes of the whole KV page pool.", bm.num_pages * bm.page_bytes if bm else 0),
        ]
        for name, doc, v in gauges:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, float(v))
            yield g


class ServerMetrics:
    def __init__(self, engine: AsyncLLMEngine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStateCollector(engine, model_name))
        labels = ["model_name"]
        self.step_latency = Histogram("maskkv_step_latency_seconds", "Wall time of one engine step.", labels,
                                      buckets=STEP_LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.tokens_per_second = Histogram(
            "maskkv_request_tokens_per_second",
            "Generated tokens per second of a finished request, from its first step to its end.",
            labels, buckets=TOKENS_PER_SECOND_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.e2e_latency = Histogram("maskkv_e2e_request_latency_seconds", "Arrival to finish of a request.",
                                     labels, buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.queue_time = Histogram("maskkv_request_queue_time_seconds", "Arrival to first step of a request "
                                    "(observed at its first step).",
                                    labels, buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.finished = Counter("maskkv_request_success", "Finished requests, by finish reason.",
                                labels + ["finish_reason"], registry=self.registry)  # fmt: skip
        self.aborted = Counter("maskkv_request_abort", "Requests aborted before they finished (client gone, "
                               "a failed batch).", labels, registry=self.registry)  # fmt: skip
        self.generation_tokens = Counter("maskkv_generation_tokens", "Generated tokens of finished requests.",
                                         labels, registry=self.registry)  # fmt: skip
        self.prompt_tokens = Counter("maskkv_prompt_tokens", "Prompt tokens of finished requests.", labels,
                                     registry=self.registry)  # fmt: skip
        self.model_name = model_name
        for metric in (self.step_latency, self.tokens_per_second, self.e2e_latency, self.queue_time,
                       self.generation_tokens, self.prompt_tokens, self.aborted):  # fmt: skip
            metric.labels(model_name)  # exported at zero before the first request
        engine.step_listeners.append(self.observe_step)

    def observe_step(self, stats: StepStats) -> None:
        name = self.model_name
        self.step_latency.labels(name).observe(stats.latency)
        for out in stats.finished:
            m = out.metrics
            if m.tokens_per_second is not None:
                self.tokens_per_second.labels(name).observe(m.tokens_per_second)
            if m.latency is not None:
                self.e2e_latency.labels(name).observe(m.latency)
            self.finished.labels(name, out.outputs[0].finish_reason or "unknown").inc()
            self.generation_tokens.labels(name).inc(len(out.outputs[0].token_ids))
            self.prompt_tokens.labels(name).inc(len(out.prompt_token_ids))

    def observe_start(self, first: RequestOutput) -> None:
        """A request's first output: its time in the queue, observed even if it is aborted later."""
        if first.metrics.time_in_queue is not None:
            self.queue_time.labels(self.model_name).observe(first.metrics.time_in_queue)

    def observe_abort(self) -> None:
        self.aborted.labels(self.model_name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
