"""pytest plugin (entry point ``pytest11``): fixtures for apps using flask-statemanager.

``state_app``
    A fresh Flask app with the extension initialised on the memory store (set
    ``STATEMANAGER_*`` config by overriding the ``state_app_config`` fixture).
``state_manager``
    The singleton, reset before and after the test, with ``state_app``'s
    context pushed.
``state_factory``
    ``state_factory(state_type="user", data=None, *, state_id=None, **options)``
    registers a state (a fresh id unless given; options go to ``register_state``)
    and returns the record.

Each fixture calls ``StateManager.reset_instance()`` before and after the test,
so definitions and stores never leak between tests.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from .extension import StateManager
from .records import State


@pytest.fixture
def state_app_config() -> dict[str, Any]:
    """Config for ``state_app``; override this fixture to choose a store."""
    return {"TESTING": True, "STATEMANAGER_STORE": "memory"}


@pytest.fixture
def state_app(state_app_config: dict[str, Any], tmp_path: Path) -> Iterator[Flask]:
    """A Flask app with a freshly reset StateManager initialised on it."""
    StateManager.reset_instance()
    app = Flask("statemanager_test_app", instance_path=str(tmp_path / "instance"))
    app.config.update(state_app_config)
    StateManager().init_app(app)
    yield app
    StateManager.reset_instance()


@pytest.fixture
def state_manager(state_app: Flask) -> Iterator[StateManager]:
    """The reset singleton, with ``state_app``'s app context pushed."""
    with state_app.app_context():
        yield StateManager()


@pytest.fixture
def state_factory(state_manager: StateManager) -> Callable[..., State]:
    """Make states with unique ids: ``state_factory("user", {"plan": "pro"})``."""
    counter = itertools.count(1)

    def make(
        state_type: str = "user",
        data: dict[str, Any] | None = None,
        *,
        state_id: str | None = None,
        **options: Any,
    ) -> State:
        state_id = state_id or f"{state_type}_{next(counter)}"
        return state_manager.register_state(state_id, state_type, {"data": data or {}}, **options)

    return make
