"""Prometheus metrics of one process, in a registry of its own (so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Every metric Satchel exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("route", "method", "status")
        self.requests = Counter(
            "satchel_http_requests", "HTTP requests answered.", labels, registry=self.registry
        )
        self.latency = Histogram(
            "satchel_http_request_duration_seconds",
            "Time to answer an HTTP request.",
            labels,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.db_up = Gauge(
            "satchel_database_up", "1 while the database answers.", registry=self.registry
        )

    def observe_request(self, *, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration."""
        key = (route, method, str(status))
        self.requests.labels(*key).inc()
        self.latency.labels(*key).observe(seconds)
