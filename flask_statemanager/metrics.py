"""In-process metrics and structured operation logs.

Each app keeps one :class:`Metrics`: counts per operation, per transition
(by type, and by type, transition and from/to status), per error type,
conflicts, validation rejections per state type, callback failures, expiries,
and a latency histogram per operation. :mod:`.prometheus` serves them at
``/metrics`` in Prometheus text format.
:func:`log_state_operation` writes one JSON log line per operation to the
``flask_statemanager`` logger (at INFO; nothing is formatted unless enabled).
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import Counter
from typing import Any

from . import codec

logger = logging.getLogger("flask_statemanager")

#: Upper bounds of the latency histogram buckets, in milliseconds.
LATENCY_BUCKETS_MS = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


class Metrics:
    """Thread-safe counters and latency histograms for one app."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.operations: Counter[str] = Counter()
            self.errors: Counter[str] = Counter()
            self.status_changes: Counter[tuple[str, str, str, str]] = Counter()
            self.rejections: Counter[tuple[str, str]] = Counter()
            self.conflicts = 0
            self.callback_errors = 0
            self.callback_failures = 0
            self.signal_errors = 0
            self.expired = 0
            self._latency: dict[str, list[int]] = {}
            self._latency_sum: dict[str, float] = {}

    def observe(self, operation: str, duration_ms: float, error: str | None = None) -> None:
        """Count one operation, its latency, and its error class if it failed."""
        with self._lock:
            self.operations[operation] += 1
            if error is not None:
                self.errors[f"{operation}:{error}"] += 1
                if error == "StateConflictError":
                    self.conflicts += 1
            buckets = self._latency.get(operation)
            if buckets is None:
                buckets = self._latency[operation] = [0] * (len(LATENCY_BUCKETS_MS) + 1)
            buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, duration_ms)] += 1
            self._latency_sum[operation] = self._latency_sum.get(operation, 0.0) + duration_ms

    def committed(
        self,
        state_type: str,
        transition: str,
        from_status: str | None = None,
        to_status: str | None = None,
    ) -> None:
        """Count one committed change (``from_status`` is ``None`` on create)."""
        with self._lock:
            self.status_changes[(state_type, transition, from_status or "", to_status or "")] += 1
            if transition == "expire":
                self.expired += 1

    def rejected(self, state_type: str, error: str) -> None:
        """Count one change refused by validation, the lifecycle or a limit."""
        with self._lock:
            self.rejections[(state_type, error)] += 1

    def callback_error(self, final: bool) -> None:
        """Count a callback that raised; *final* when it will not be retried."""
        with self._lock:
            self.callback_errors += 1
            if final:
                self.callback_failures += 1

    def signal_error(self) -> None:
        """Count a signal receiver that raised."""
        with self._lock:
            self.signal_errors += 1

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of every metric."""
        with self._lock:
            # Per "type:transition", summed from the status changes (one counter per write).
            transitions: Counter[str] = Counter()
            for (state_type, transition, _, _), n in self.status_changes.items():
                transitions[f"{state_type}:{transition}"] += n
            latency = {}
            for op, buckets in self._latency.items():
                count = sum(buckets)
                latency[op] = {
                    "count": count,
                    "sum_ms": round(self._latency_sum[op], 3),
                    "mean_ms": round(self._latency_sum[op] / count, 3) if count else 0.0,
                    "buckets_ms": {
                        **{str(b): n for b, n in zip(LATENCY_BUCKETS_MS, buckets, strict=False)},
                        "+Inf": buckets[-1],
                    },
                }
            return {
                "operations": dict(self.operations),
                "errors": dict(self.errors),
                "transitions": dict(transitions),
                "status_changes": [
                    {
                        "type": t,
                        "transition": name,
                        "from_status": before or None,
                        "to_status": after or None,
                        "count": n,
                    }
                    for (t, name, before, after), n in sorted(self.status_changes.items())
                ],
                "rejections": {f"{t}:{error}": n for (t, error), n in self.rejections.items()},
                "conflicts": self.conflicts,
                "expired": self.expired,
                "callback_errors": self.callback_errors,
                "callback_failures": self.callback_failures,
                "signal_errors": self.signal_errors,
                "latency": latency,
            }


def log_state_operation(
    operation: str,
    state_id: str | None,
    transition_type: str | None = None,
    duration_ms: float | None = None,
    **fields: Any,
) -> None:
    """Write one structured (JSON) log line for a state operation.

    The record also carries the fields as ``record.statemanager`` for log
    handlers that build their own format.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    entry = {
        "event": "state_operation",
        "operation": operation,
        "state_id": state_id,
        "transition": transition_type,
        "duration_ms": None if duration_ms is None else round(duration_ms, 3),
        **fields,
    }
    logger.info(codec.dumps_str(entry, lenient=True), extra={"statemanager": entry})
