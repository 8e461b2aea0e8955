"""The server's Prometheus metrics, on a registry of its own (two servers in one process, as in tests,
never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tailorlm_requests",
            "HTTP requests answered, by route and status code",
            ["route", "code"],
            registry=r,
        )
        self.errors = Counter(
            "tailorlm_errors", "Answers with a 4xx or 5xx status, by code", ["code"], registry=r
        )
        self.batch_size = Histogram(
            "tailorlm_batch_size", "Rows in each decode step", buckets=_ROWS, registry=r
        )
        self.prefill_rows = Histogram(
            "tailorlm_prefill_rows", "New rows prefilled together", buckets=_ROWS, registry=r
        )
        self.time_to_first_token = Histogram(
            "tailorlm_time_to_first_token_seconds",
            "From arrival to the first token",
            buckets=_SECONDS,
            registry=r,
        )
        self.latency = Histogram(
            "tailorlm_request_latency_seconds", "From arrival to the last token", buckets=_SECONDS, registry=r
        )
        self.tokens = Counter("tailorlm_generated_tokens", "Tokens generated", registry=r)
        self.slot_hits = Counter("tailorlm_slot_hits", "Requests whose module was resident", registry=r)
        self.slot_misses = Counter("tailorlm_slot_misses", "Requests whose module was loaded", registry=r)
        self.queue_depth = Gauge("tailorlm_queue_depth", "Requests waiting for the running batch", registry=r)
        self.watchdog_stalls = Counter(
            "tailorlm_watchdog_stalls",
            "Times the engine loop went --watchdog-seconds without advancing while work was pending",
            registry=r,
        )
        self.auth_failures = Counter(
            "tailorlm_auth_failures", "Requests with a missing, malformed or unknown key", registry=r
        )
        self.dropped_connections = Counter(
            "tailorlm_dropped_connections",
            "Connections closed by the server's limits, by reason",
            ["reason"],
            registry=r,
        )
        self.training_jobs = Counter(
            "tailorlm_training_jobs", "Background retraining jobs, by outcome", ["state"], registry=r
        )

    def text(self) -> bytes:
        return generate_latest(self.registry)
