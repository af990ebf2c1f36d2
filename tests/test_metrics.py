"""Metrics on every real store: ``get_metrics()``, ``/metrics`` and the operation logs."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from flask_statemanager import StateManager
from flask_statemanager.errors import (
    InvalidTransitionError,
    StateConflictError,
    StateLimitError,
    StateValidationError,
)

from .conftest import make_app


def user(**data: Any) -> dict[str, Any]:
    return {"type": "user", "data": data}


def _app(tmp_path: Path, **config: Any) -> Flask:
    app = make_app(tmp_path, **config)
    manager = StateManager()
    manager.register_type("user")
    manager.register_type("cart", default_ttl=0.05)
    manager.register_validator("user", lambda state: state["data"].get("age", 0) >= 0)
    manager.init_app(app)
    with app.app_context():
        manager.create_all()
        manager.store.reset()
    return app


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Flask]:
    config: dict[str, Any] = {}
    if request.param == "memory":
        config["STATEMANAGER_STORE"] = "memory"
    elif request.param == "postgres":
        config["STATEMANAGER_DATABASE_URI"] = request.getfixturevalue("postgres_url")
    elif request.param == "redis":
        config["STATEMANAGER_STORE"] = "redis"
        config["STATEMANAGER_REDIS_URL"] = request.getfixturevalue("clean_redis")
    yield _app(tmp_path, STATEMANAGER_CALLBACK_RETRIES=1, **config)


def _scrape(app: Flask) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed: ``{(sample name, sorted labels): value}``."""
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _exercise(sm: StateManager) -> None:
    """Operations whose every outcome shows in the metrics."""

    def failing(state_id: str, old: Any, new: Any, transition_type: str) -> None:
        raise ConnectionError("webhook down")

    sm.register_callback("user_suspended", failing)
    sm.register_state("u1", "user", user(age=30))
    sm.register_state("u2", "user", user(age=40))
    sm.transition("u1", "activate")
    sm.transition("u1", "suspend")  # its callback fails twice (one retry)
    sm.update_state("u2", {"data": {"age": 41}})
    with pytest.raises(StateConflictError):
        sm.update_state("u2", {"data": {"age": 42}}, expected_version=1)
    with pytest.raises(StateValidationError):
        sm.update_state("u2", {"data": {"age": -1}})  # the validator says no
    with pytest.raises(InvalidTransitionError):
        sm.transition("u2", "suspend")  # pending cannot be suspended
    with pytest.raises(StateLimitError):
        sm.update_state("u2", {"data": {"blob": "x" * 2_000_000}})
    sm.register_state("c1", "cart", {"type": "cart", "data": {}})
    time.sleep(0.1)
    assert sm.sweep_expired() == 1


def test_get_metrics_counts_every_outcome(app: Flask) -> None:
    with app.app_context():
        sm = StateManager()
        _exercise(sm)
        metrics = sm.get_metrics()
    assert metrics["operations"]["register_state"] == 3
    assert metrics["operations"]["transition"] == 3
    assert metrics["operations"]["update_state"] == 4
    assert metrics["transitions"] == {
        "user:create": 2,
        "user:activate": 1,
        "user:suspend": 1,
        "user:update": 1,
        "cart:create": 1,
        "cart:expire": 1,
    }
    by_status = {
        (c["type"], c["transition"], c["from_status"], c["to_status"]): c["count"]
        for c in metrics["status_changes"]
    }
    assert by_status == {
        ("user", "create", None, "pending"): 2,
        ("user", "activate", "pending", "active"): 1,
        ("user", "suspend", "active", "suspended"): 1,
        ("user", "update", "pending", "pending"): 1,
        ("cart", "create", None, "pending"): 1,
        ("cart", "expire", "pending", "expired"): 1,
    }
    assert metrics["conflicts"] == 1
    assert metrics["rejections"] == {
        "user:StateValidationError": 1,
        "user:InvalidTransitionError": 1,
        "user:StateLimitError": 1,
    }
    assert metrics["errors"]["update_state:StateConflictError"] == 1
    assert metrics["callback_errors"] == 2 and metrics["callback_failures"] == 1
    assert metrics["expired"] == 1
    latency = metrics["latency"]["update_state"]
    assert latency["count"] == 4
    assert sum(latency["buckets_ms"].values()) == 4
    assert latency["sum_ms"] > 0


def test_bulk_rejections_are_counted_once_per_refused_item(app: Flask) -> None:
    with app.app_context():
        sm = StateManager()
        result = sm.bulk_register(
            [
                {"state_id": "b1", "state_type": "user", "initial_data": user(age=1)},
                {"state_id": "b2", "state_type": "user", "initial_data": user(age=-5)},
                {"state_id": "b3", "state_type": "user", "initial_data": user(age=-6)},
            ]
        )
        assert set(result.states) == {"b1"}
        metrics = sm.get_metrics()
    assert metrics["rejections"] == {"user:StateValidationError": 2}
    assert metrics["transitions"] == {"user:create": 1}


def test_a_call_failing_with_any_exception_counts_as_an_error(app: Flask) -> None:
    """A validator's own bug (a KeyError) fails the call: it is an error, not a success."""
    with app.app_context():
        sm = StateManager()
        sm.register_validator("user", lambda state: state["data"]["email"] is not None)
        with pytest.raises(KeyError):
            sm.bulk_register([{"state_id": "k1", "state_type": "user", "initial_data": user()}])
        metrics = sm.get_metrics()
    assert metrics["operations"]["bulk_register"] == 1
    assert metrics["errors"] == {"bulk_register:KeyError": 1}


def test_prometheus_endpoint_reads_the_same_numbers(app: Flask) -> None:
    with app.app_context():
        _exercise(StateManager())
    samples = _scrape(app)
    assert samples[("statemanager_operations_total", (("operation", "transition"),))] == 3
    suspend = (
        ("from_status", "active"),
        ("to_status", "suspended"),
        ("transition", "suspend"),
        ("type", "user"),
    )
    assert samples[("statemanager_transitions_total", suspend)] == 1
    create = (("from_status", ""), ("to_status", "pending"), ("transition", "create"))
    assert samples[("statemanager_transitions_total", (*create, ("type", "user")))] == 2
    assert samples[("statemanager_conflicts_total", ())] == 1
    assert samples[("statemanager_expiries_total", ())] == 1
    assert samples[("statemanager_callback_failures_total", ())] == 1
    assert samples[("statemanager_callback_errors_total", ())] == 2
    rejection = (("error", "InvalidTransitionError"), ("type", "user"))
    assert samples[("statemanager_validation_rejections_total", rejection)] == 1
    error = (("error", "StateConflictError"), ("operation", "update_state"))
    assert samples[("statemanager_operation_errors_total", error)] == 1
    # The histogram: in seconds, cumulative, +Inf equal to the count.
    op = ("operation", "update_state")
    assert samples[("statemanager_operation_duration_seconds_count", (op,))] == 4
    assert samples[("statemanager_operation_duration_seconds_bucket", (("le", "+Inf"), op))] == 4
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in samples.items()
        if name == "statemanager_operation_duration_seconds_bucket" and op in labels
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[0][0] == 0.0005
    assert 0 < samples[("statemanager_operation_duration_seconds_sum", (op,))] < 60


def test_two_apps_keep_their_own_metrics(tmp_path: Path) -> None:
    first = _app(tmp_path / "a", STATEMANAGER_STORE="memory")
    second = _app(tmp_path / "b", STATEMANAGER_STORE="memory")
    with first.app_context():
        StateManager().register_state("u1", "user", user())
        StateManager().register_state("u2", "user", user())
    with second.app_context():
        StateManager().register_state("u1", "user", user())
    key = ("statemanager_operations_total", (("operation", "register_state"),))
    assert _scrape(first)[key] == 2
    assert _scrape(second)[key] == 1
    StateManager().init_app(first)  # re-initialised: a fresh runtime, still served once
    assert key not in _scrape(first)


def test_cache_counters_are_exported(tmp_path: Path, clean_redis: str) -> None:
    app = _app(tmp_path, STATEMANAGER_REDIS_URL=clean_redis)
    with app.app_context():
        sm = StateManager()
        sm.register_state("u1", "user", user())
        sm.get_state("u1")
        sm.get_state("u1")
        stats = sm.get_metrics()["cache"]
    samples = _scrape(app)
    assert samples[("statemanager_cache_events_total", (("event", "hits"),))] == stats["hits"]
    assert samples[("statemanager_cache_events_total", (("event", "misses"),))] == stats["misses"]
    assert samples[("statemanager_cache_hit_ratio", ())] == pytest.approx(stats["hit_rate"])


@pytest.mark.parametrize("off", [None, ""])
def test_metrics_url_can_be_turned_off(tmp_path: Path, off: str | None) -> None:
    app = _app(tmp_path, STATEMANAGER_STORE="memory", STATEMANAGER_METRICS_URL=off)
    assert app.test_client().get("/metrics").status_code == 404


def test_metrics_url_can_move(tmp_path: Path) -> None:
    app = _app(tmp_path, STATEMANAGER_STORE="memory", STATEMANAGER_METRICS_URL="/internal/prom")
    client = app.test_client()
    assert client.get("/metrics").status_code == 404
    assert b"statemanager_operations_total" in client.get("/internal/prom").data


def test_one_structured_log_line_per_operation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = _app(tmp_path, STATEMANAGER_STORE="memory")
    with app.app_context(), caplog.at_level(logging.INFO, logger="flask_statemanager"):
        sm = StateManager()
        sm.register_state("u1", "user", user())
        sm.transition("u1", "activate", actor="alice")
        with pytest.raises(InvalidTransitionError):
            sm.transition("u1", "activate")
    entries = [json.loads(r.getMessage()) for r in caplog.records]
    assert [(e["operation"], e["state_id"], e["transition"], e["error"]) for e in entries] == [
        ("register_state", "u1", "create", None),
        ("transition", "u1", "activate", None),
        ("transition", "u1", "activate", "InvalidTransitionError"),
    ]
    for entry, record in zip(entries, caplog.records, strict=True):
        assert entry["event"] == "state_operation"
        assert entry["duration_ms"] >= 0
        assert record.statemanager == entry  # type: ignore[attr-defined]
