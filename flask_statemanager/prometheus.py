"""``/metrics``: the app's :class:`~flask_statemanager.metrics.Metrics` in Prometheus text format.

Served at ``STATEMANAGER_METRICS_URL`` when the ``metrics`` extra
(``prometheus-client``) is installed. Each app gets its own
``CollectorRegistry`` holding one :class:`StateManagerCollector`, which reads
the app's metrics at scrape time, so two apps in one process never share or
collide on a metric, and nothing is registered in the global registry. A
scrape touches no database nor Redis.

To serve the metrics yourself (say, with your own collectors next to them),
set ``STATEMANAGER_METRICS_URL = None`` and register
``StateManagerCollector(app)`` in your registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from flask import Response

from .metrics import LATENCY_BUCKETS_MS

if TYPE_CHECKING:
    from flask import Flask
    from prometheus_client.core import Metric

ENDPOINT = "statemanager_metrics"


class StateManagerCollector:
    """A Prometheus collector reading one app's metrics when scraped.

    :param app: the Flask app whose ``app.extensions["statemanager"]`` runtime
        holds the metrics; an app re-initialised keeps being read.
    """

    def __init__(self, app: Flask) -> None:
        self.app = app

    def describe(self) -> list[Metric]:
        # No fixed description: the registry must not collect at registration.
        return []

    def collect(self) -> Iterator[Metric]:
        """The metric families, from one consistent snapshot."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        runtime: Any = self.app.extensions.get("statemanager")
        if runtime is None:
            return
        snap = runtime.metrics.snapshot()

        def counter(name: str, doc: str, labels: list[str], rows: Any) -> CounterMetricFamily:
            family = CounterMetricFamily(f"statemanager_{name}", doc, labels=labels)
            for values, count in rows:
                family.add_metric(list(values), count)
            return family

        yield counter(
            "operations",
            "State operations run, by operation (failed ones included).",
            ["operation"],
            (((op,), n) for op, n in snap["operations"].items()),
        )
        yield counter(
            "operation_errors",
            "State operations that raised, by operation and error class.",
            ["operation", "error"],
            ((tuple(key.split(":", 1)), n) for key, n in snap["errors"].items()),
        )
        yield counter(
            "transitions",
            "Committed changes, by state type, transition and from/to status.",
            ["type", "transition", "from_status", "to_status"],
            (
                (
                    (c["type"], c["transition"], c["from_status"] or "", c["to_status"] or ""),
                    c["count"],
                )
                for c in snap["status_changes"]
            ),
        )
        yield counter(
            "validation_rejections",
            "Changes refused by a validator, the lifecycle or a limit, by state type and error.",
            ["type", "error"],
            ((tuple(key.split(":", 1)), n) for key, n in snap["rejections"].items()),
        )
        for name, key, doc in (
            ("conflicts", "conflicts", "Writes refused because the expected version was stale."),
            ("expiries", "expired", "States whose TTL expiry was recorded."),
            ("callback_errors", "callback_errors", "Callback attempts that raised."),
            ("callback_failures", "callback_failures", "Callbacks that failed every attempt."),
            ("signal_errors", "signal_errors", "Signal receivers that raised."),
        ):
            yield counter(name, doc, [], [((), snap[key])])

        duration = HistogramMetricFamily(
            "statemanager_operation_duration_seconds",
            "Duration of state operations, by operation.",
            labels=["operation"],
        )
        bounds = [*(str(b / 1000) for b in LATENCY_BUCKETS_MS), "+Inf"]
        for op, latency in snap["latency"].items():
            cumulative, buckets = 0, []
            for bound, key in zip(bounds, latency["buckets_ms"], strict=True):
                cumulative += latency["buckets_ms"][key]
                buckets.append((bound, cumulative))
            duration.add_metric([op], buckets, latency["sum_ms"] / 1000)
        yield duration

        cache = runtime.store.cache_stats()
        if cache is not None:
            yield counter(
                "cache_events",
                "Redis cache events since start (hits, misses, fills, errors, ...).",
                ["event"],
                (
                    ((event,), n)
                    for event, n in cache.items()
                    if isinstance(n, int) and not isinstance(n, bool)
                ),
            )
            ratio = GaugeMetricFamily(
                "statemanager_cache_hit_ratio", "Share of reads served by the Redis cache."
            )
            if cache["hit_rate"] is not None:
                ratio.add_metric([], cache["hit_rate"])
                yield ratio


def add_metrics_view(app: Flask, url: str) -> bool:
    """Serve the app's metrics at *url*; ``False`` (and nothing added) without
    ``prometheus-client`` or when the view is already there."""
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    except ImportError:
        return False
    if ENDPOINT in app.view_functions:
        return False
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateManagerCollector(app))

    def metrics() -> Response:
        response = app.response_class(generate_latest(registry), mimetype=None)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        response.headers["Cache-Control"] = "no-store"
        return response

    metrics.__doc__ = "The state manager's metrics in Prometheus text format."
    app.add_url_rule(url, endpoint=ENDPOINT, view_func=metrics, methods=["GET"])
    return True
