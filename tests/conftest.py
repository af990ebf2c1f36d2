"""Shared fixtures: real servers, per-store apps, and a leak check.

PostgreSQL comes from ``STATEMANAGER_TEST_POSTGRES_URL`` and Redis from
``STATEMANAGER_TEST_REDIS_URL`` (``scripts/servers`` starts both). When one
cannot be reached its tests are skipped — except under ``CI=true``, where that
fails the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from flask import Flask, has_app_context

from flask_statemanager import StateManager

IN_CI = os.environ.get("CI", "").lower() == "true"
T = TypeVar("T")


def _unreachable(what: str, reason: str) -> None:
    message = f"{what} is not reachable ({reason}); start it with `bash scripts/servers start`."
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of the real PostgreSQL test database."""
    url = os.environ.get("STATEMANAGER_TEST_POSTGRES_URL")
    if not url:
        _unreachable("PostgreSQL", "STATEMANAGER_TEST_POSTGRES_URL is not set")
        raise AssertionError  # unreachable: _unreachable skips or fails
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        _unreachable("PostgreSQL", str(exc.orig).splitlines()[0])
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the real Redis test server (``scripts/servers`` starts one)."""
    import redis

    url = os.environ.get("STATEMANAGER_TEST_REDIS_URL")
    if not url:
        _unreachable("Redis", "STATEMANAGER_TEST_REDIS_URL is not set")
        raise AssertionError  # unreachable: _unreachable skips or fails
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unreachable("Redis", str(exc))
    finally:
        client.close()
    return url


@pytest.fixture
def clean_redis(redis_url: str) -> Iterator[str]:
    """The Redis test database, emptied before the test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    yield redis_url


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Every test starts from a reset singleton and leaves no app context pushed."""
    StateManager.reset_instance()
    yield
    leaked = has_app_context()
    StateManager.reset_instance()
    assert not leaked, "a test left an application context pushed"


def make_app(tmp_path: Path, **config: Any) -> Flask:
    """A fresh Flask app with its own instance folder and the given config."""
    app = Flask(f"test_{tmp_path.name}", instance_path=str(tmp_path / "instance"))
    app.config.update(TESTING=True, **config)
    return app


def explain_page_query(
    engine: sa.Engine, search: Callable[[], T], *, turned_off: Sequence[str] = ("seqscan",)
) -> tuple[T, str]:
    """Run *search* and return its result and PostgreSQL's plan for its page query
    (the statement with ``ORDER BY``), with the ``enable_<name>`` plan types of
    *turned_off* priced out, so an index that can serve the query is the cheaper plan."""
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if "ORDER BY" in statement:
            statements.append((statement, params))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        result = search()
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    (statement, params), *_ = statements
    with engine.connect() as conn:
        for name in turned_off:
            conn.exec_driver_sql(f"SET enable_{name} = off")
        rows = conn.exec_driver_sql("EXPLAIN " + statement, params)
        return result, " ".join(str(row[0]) for row in rows)
