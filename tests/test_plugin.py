"""The pytest plugin, exercised in a separate pytest run with ``pytester``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

# Imported before any in-process pytester run: a run drops the modules it imported,
# and SQLAlchemy warns when its PostgreSQL dialect is imported a second time.
import sqlalchemy.dialects.postgresql  # noqa: F401

from flask_statemanager import StateManager

from .conftest import make_app


def test_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from flask_statemanager import StateManager

        def test_manager(state_manager, state_app):
            assert state_manager is StateManager()
            assert state_app.extensions["statemanager"].store.kind == "memory"
            state_manager.register_type("cart")
            state_manager.register_state("c1", "cart", {"data": {"n": 1}})
            assert state_manager.get_state("c1")["data"] == {"n": 1}

        def test_is_reset_between_tests(state_manager):
            assert "cart" not in state_manager.types
            assert state_manager.get_state("c1") is None

        def test_factory(state_factory, state_manager):
            a = state_factory("user", {"plan": "pro"})
            b = state_factory()
            assert a["state_id"] != b["state_id"]
            assert state_manager.get_state(a["state_id"])["data"] == {"plan": "pro"}
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_config_override_picks_sqlite(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def state_app_config():
            return {"TESTING": True}

        def test_sqlite(state_manager, state_app):
            assert state_manager.store.kind == "sql"
            state_manager.register_state("u1", "user", {"data": {}})
            assert state_manager.get_state_history("u1")[0]["transition"] == "create"
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_receivers_a_test_connects_are_gone_in_the_next(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from flask_statemanager import signals

        seen = []

        def on_created(sender, **extra):
            seen.append(extra["state_id"])

        def kept(sender, **extra):
            seen.append("kept")

        signals.state_changed.connect(kept)  # at import time: stays for every test

        def test_one(state_factory):
            signals.state_created.connect(on_created)
            signals.state_deleted.connect(on_created, weak=False)
            state_factory("user", {"a": 1})
            assert seen == ["kept", "user_1"]

        def test_two(state_factory, state_manager):
            seen.clear()
            state_factory("user", {"a": 2})
            state_manager.delete_state("user_1")
            assert seen == ["kept", "kept"]
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


@pytest.fixture
def plugin_tables(postgres_url: str, tmp_path: Path) -> Iterator[str]:
    """The PostgreSQL URL, with the ``plugx_`` tables made (so rows could outlive a
    test), dropped afterwards."""
    app = make_app(
        tmp_path, STATEMANAGER_DATABASE_URI=postgres_url, STATEMANAGER_TABLE_PREFIX="plugx_"
    )
    StateManager().init_app(app)
    with app.app_context():
        StateManager().create_all()
    StateManager.reset_instance()
    yield postgres_url
    engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS plugx_states, plugx_history")
        conn.exec_driver_sql("DROP TABLE IF EXISTS plugx_alembic_version")
    engine.dispose()


@pytest.mark.parametrize("store", ["postgresql", "redis"])
def test_each_test_starts_on_an_empty_store(
    pytester: pytest.Pytester, request: pytest.FixtureRequest, store: str
) -> None:
    if store == "postgresql":
        url = request.getfixturevalue("plugin_tables")
        config = {"STATEMANAGER_DATABASE_URI": url, "STATEMANAGER_TABLE_PREFIX": "plugx_"}
    else:
        url = request.getfixturevalue("clean_redis")
        config = {"STATEMANAGER_STORE": "redis", "STATEMANAGER_REDIS_URL": url}
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.fixture
        def state_app_config():
            return {{"TESTING": True, **{config!r}}}

        @pytest.mark.parametrize("run", [1, 2])
        def test_same_ids_each_time(state_manager, state_factory, run):
            assert state_manager.store.kind == {"sql" if store == "postgresql" else "redis"!r}
            assert state_manager.search_states("user").total == 0
            state_factory("user", {{"run": run}})  # user_1, as in the run before
            assert state_manager.get_state("user_1")["data"] == {{"run": run}}
        """
    )
    # In a subprocess: SQLAlchemy's PostgreSQL dialect cannot be imported twice in one.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
