"""The singleton, init_app, per-app isolation, and the ways to give it a database."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_statemanager import ConfigurationError, StateManager, StateType
from flask_statemanager.stores.sql_tables import index_name

from .conftest import explain_page_query, make_app


def test_singleton() -> None:
    first = StateManager()
    assert StateManager() is first
    assert StateManager.get_instance() is first
    assert StateManager.get_instance(database_manager="memory://") is first


def test_reset_instance_keeps_references_valid(tmp_path: Path) -> None:
    manager = StateManager()
    manager.register_type("cart", default_ttl=60)
    app = make_app(tmp_path, STATEMANAGER_STORE="memory")
    manager.init_app(app)
    StateManager.reset_instance()
    assert StateManager() is manager
    assert "cart" not in manager.types
    assert set(manager.types) == {t.value for t in StateType}
    assert "statemanager" not in app.extensions
    with app.app_context(), pytest.raises(ConfigurationError, match="init_app"):
        manager.get_state("x")


def test_init_app_sets_config_defaults_and_creates_sqlite_tables(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    StateManager().init_app(app)
    assert app.config["STATEMANAGER_MAX_PER_PAGE"] == 500
    database = Path(app.instance_path) / "statemanager.sqlite3"
    assert database.exists()
    with app.app_context():
        StateManager().register_state("u1", "user", {"data": {}})
    engine = sa.create_engine(f"sqlite:///{database}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("SELECT count(*) FROM statemanager_history").scalar() == 1
    engine.dispose()


def test_two_apps_are_isolated(tmp_path: Path) -> None:
    manager = StateManager()
    one = make_app(tmp_path / "one")
    two = make_app(tmp_path / "two")
    manager.init_app(one)
    manager.init_app(two)
    with one.app_context():
        manager.register_state("shared_id", "user", {"data": {"app": "one"}})
    with two.app_context():
        assert manager.get_state("shared_id") is None
        manager.register_state("shared_id", "user", {"data": {"app": "two"}})
    with one.app_context():
        assert manager.get_state("shared_id")["data"] == {"app": "one"}
        assert manager.get_metrics()["operations"]["register_state"] == 1
    # Outside any app context with two apps, the manager refuses to guess.
    with pytest.raises(ConfigurationError, match="app_context"):
        manager.get_state("shared_id")


def test_app_factory_and_only_app_outside_context(tmp_path: Path) -> None:
    manager = StateManager()

    def create_app() -> Flask:
        app = make_app(tmp_path, STATEMANAGER_STORE="memory")
        manager.init_app(app)
        return app

    create_app()
    manager.register_state("u1", "user", {"data": {"n": 1}})
    assert manager.get_state("u1")["data"] == {"n": 1}
    # No Redis configured: no cache, and health and metrics say so.
    assert manager.get_metrics()["cache"] is None
    assert manager.get_health_status()["cache_hit_rate"] is None
    assert set(manager.get_health_status()["checks"]) == {"database"}


def test_reinit_disposes_previous_store(tmp_path: Path) -> None:
    app = make_app(tmp_path, STATEMANAGER_STORE="memory")
    manager = StateManager()
    manager.init_app(app)
    with app.app_context():
        manager.register_state("u1", "user", {"data": {}})
        manager.init_app(app)
        assert manager.get_state("u1") is None  # a fresh memory store


def test_flask_sqlalchemy_database(tmp_path: Path) -> None:
    app = make_app(tmp_path, SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'app.db'}")
    db = SQLAlchemy()
    db.init_app(app)
    manager = StateManager(database_manager=db)
    manager.init_app(app)
    with app.app_context():
        manager.register_state("u1", "user", {"data": {"via": "flask-sqlalchemy"}})
        names = sa.inspect(db.engine).get_table_names()
        assert {"statemanager_states", "statemanager_history"} <= set(names)
        assert manager.get_state("u1")["data"] == {"via": "flask-sqlalchemy"}


def test_engine_and_url_database_managers(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'engine.db'}")
    manager = StateManager.get_instance(database_manager=engine)
    app = make_app(tmp_path)
    manager.init_app(app)
    with app.app_context():
        manager.register_state("u1", "user", {"data": {}})
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT state_id FROM statemanager_states").scalar() == "u1"
    engine.dispose()


def test_standalone_without_app(tmp_path: Path) -> None:
    manager = StateManager.get_instance(database_manager=f"sqlite:///{tmp_path / 'alone.db'}")
    manager.register_state("u1", "user", {"data": {"standalone": True}})
    assert manager.get_state("u1")["data"] == {"standalone": True}
    assert manager.get_health_status()["status"] == "healthy"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("STATEMANAGER_CALLBACK_MODE", "async"),
        ("STATEMANAGER_MAX_PER_PAGE", 0),
        ("STATEMANAGER_STORE", "cassandra"),
        ("STATEMANAGER_DATABASE_URI", "mysql://x@localhost/db"),
        ("STATEMANAGER_DATABASE_URI", "not a url"),
        ("STATEMANAGER_SQLITE_SYNCHRONOUS", "SOMETIMES"),
        ("STATEMANAGER_TABLE_PREFIX", "bad-prefix;"),
        ("STATEMANAGER_TABLE_PREFIX", "p" * 33),
        ("STATEMANAGER_CACHE_TTL", float("inf")),
        ("STATEMANAGER_CACHE_TIMEOUT", float("nan")),
        ("STATEMANAGER_SWEEP_INTERVAL", 0),
    ],
)
def test_bad_config_fails_at_init_app(tmp_path: Path, key: str, value: object) -> None:
    app = make_app(tmp_path, **{key: value})
    with pytest.raises(
        ConfigurationError,
        match=key.removeprefix("STATEMANAGER_")[:8] if "URI" not in key else "database|URL",
    ):
        StateManager().init_app(app)


def test_no_app_and_no_database_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="init_app"):
        StateManager().get_state("x")


def test_bad_type_definitions() -> None:
    manager = StateManager()
    with pytest.raises(ConfigurationError):
        manager.register_type("cart", indexes=["data.a b"])
    with pytest.raises(ConfigurationError):
        manager.register_type("cart", indexes=["status"])
    with pytest.raises(ConfigurationError):
        manager.register_type("cart", lifecycle={"pay": ("new", "paid")})
    with pytest.raises(ConfigurationError):
        manager.register_type("cart", lifecycle={"create": (None, None)})
    with pytest.raises(TypeError):
        manager.register_validator("user", 42)  # type: ignore[arg-type]


def test_declared_index_is_used_by_search(tmp_path: Path) -> None:
    manager = StateManager()
    manager.register_type("user", indexes=["data.status"])
    app = make_app(tmp_path)
    manager.init_app(app)
    with app.app_context():
        for i in range(50):
            manager.register_state(f"u{i}", "user", {"data": {"status": f"s{i % 5}"}})
        engine = manager.store.engine  # type: ignore[attr-defined]
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            plan = " ".join(
                str(r[-1])
                for r in conn.exec_driver_sql(
                    "EXPLAIN QUERY PLAN SELECT state_id FROM statemanager_states WHERE "
                    "type = 'user' AND json_extract(data, '$.\"status\"') = 's1' "
                    "ORDER BY state_id LIMIT 50"
                )
            )
        assert "ix_statemanager_states_data_status" in plan
        page = manager.search_states("user", {"data.status": "s1"}, order_by="state_id")
        assert page.total == 10


def test_unreachable_database_is_a_typed_error_and_unhealthy(tmp_path: Path) -> None:
    from flask_statemanager import BackendUnavailableError

    app = make_app(
        tmp_path,
        STATEMANAGER_DATABASE_URI="postgresql://app:s3cret@127.0.0.1:9/nowhere",
        STATEMANAGER_ENGINE_OPTIONS={"connect_args": {"connect_timeout": 2}},
    )
    manager = StateManager()
    manager.init_app(app)  # no DDL at start-up for a server database
    with app.app_context():
        with pytest.raises(BackendUnavailableError) as info:
            manager.get_state("u1")
        assert "s3cret" not in str(info.value) and "nowhere" not in str(info.value)
        with pytest.raises(BackendUnavailableError):
            manager.register_state("u1", "user", {"data": {}})
        health = manager.get_health_status()
        assert health["status"] == "unhealthy"
        assert health["checks"]["database"]["status"] == "down"
        assert "s3cret" not in str(health)


def test_an_app_dropped_without_reset_releases_its_connections(
    tmp_path: Path, postgres_url: str
) -> None:
    """App factories in long-running processes and test suites drop apps: the
    store's pooled connections are closed with the app, not left to the GC."""
    app = make_app(tmp_path, STATEMANAGER_DATABASE_URI=postgres_url)
    StateManager().init_app(app)
    engine = app.extensions["statemanager"].store.engine
    with app.app_context():
        StateManager().get_state("anyone")  # checks a connection out and back in
    assert engine.pool.checkedin() == 1
    del app
    gc.collect()
    assert engine.pool.checkedin() == 0  # the engine was disposed with the app


@pytest.mark.parametrize(
    ("field", "data"),
    [
        ("data.status", {"status": "s1"}),
        ("data.tags.0", {"tags": {"0": "s1"}}),
        ("data.NULL", {"NULL": "s1"}),
    ],
)
def test_declared_index_is_used_by_postgresql_search(
    tmp_path: Path, postgres_url: str, field: str, data: dict[str, Any]
) -> None:
    """The search SQL repeats the declared index's expression, also for paths whose
    segments are all digits (guarded to walk objects) or spelled NULL (quoted)."""
    prefix = "searchplan_"
    app = make_app(
        tmp_path, STATEMANAGER_DATABASE_URI=postgres_url, STATEMANAGER_TABLE_PREFIX=prefix
    )
    manager = StateManager()
    manager.register_type("user", indexes=[field])
    manager.init_app(app)
    with app.app_context():
        engine = manager.store.engine  # type: ignore[attr-defined]
        with engine.begin() as conn:  # a fresh schema: no index left by an earlier run
            for table in ("history", "states", "alembic_version"):
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {prefix}{table} CASCADE")
        manager.create_all()
        manager.register_state("hit", "user", {"data": data})
        manager.register_state("miss", "user", {"data": {"tags": ["s1"], "status": "s2"}})
        page, plan = explain_page_query(
            engine, lambda: manager.search_states("user", {field: "s1"}, order_by="state_id")
        )
        assert [s["state_id"] for s in page] == ["hit"]
    assert index_name(prefix, field) in plan
