"""Faults on a real PostgreSQL server: dropped connections."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from flask_statemanager import BackendUnavailableError, StateManager

from .conftest import make_app


def _drop_other_connections(url: str) -> int:
    """Terminate every other session on the database, as a server restart would."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as conn:
        killed = conn.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
    engine.dispose()
    return int(killed)


def test_dropped_pooled_connections_are_replaced(tmp_path: Path, postgres_url: str) -> None:
    app = make_app(tmp_path, STATEMANAGER_DATABASE_URI=postgres_url)
    manager = StateManager()
    manager.init_app(app)
    with app.app_context():
        manager.create_all()
        manager.store.reset()
        manager.register_state("u1", "user", {"data": {"n": 1}})
        assert manager.get_state("u1") is not None  # the pool now holds connections
        assert _drop_other_connections(postgres_url) >= 1
        # The next read and the next write find their pooled connection dead,
        # and go on with a fresh one: the caller sees no error.
        assert manager.get_state("u1")["data"] == {"n": 1}
        assert _drop_other_connections(postgres_url) >= 1
        state = manager.update_state("u1", {"data": {"n": 2}})
        assert state["version"] == 2
        history = manager.get_state_history("u1")
        assert [c["version"] for c in history] == [1, 2]
        assert manager.get_health_status()["status"] == "healthy"


def test_the_sweep_stops_at_once_when_the_store_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unlike one unreadable state, an unavailable store fails every row: stop at the first."""
    manager = StateManager()
    app = make_app(tmp_path, STATEMANAGER_STORE="memory")
    manager.init_app(app)
    with app.app_context():
        for n in range(5):
            manager.register_state(f"s{n}", "user", {"data": {}}, ttl=0.05)
        time.sleep(0.1)
        attempts: list[str] = []

        def down(state_ids: Any, plan: Any) -> Any:
            attempts.append(state_ids[0])
            raise BackendUnavailableError("The database is unavailable.", backend="memory")

        monkeypatch.setattr(manager.store, "apply", down)  # the store goes down mid-sweep
        with pytest.raises(BackendUnavailableError):
            manager.sweep_expired()
    assert len(attempts) == 1
