"""The pytest plugin, exercised in a separate pytest run with ``pytester``."""

from __future__ import annotations

import pytest


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
