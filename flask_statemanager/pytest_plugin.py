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

``state_app`` calls ``StateManager.reset_instance()`` before and after the
test, so definitions and stores never leak between tests; on a SQL or Redis
store it creates the tables and empties the store first, so rows written by an
earlier test are gone; and it disconnects the receivers a test connected to the
signals of :mod:`flask_statemanager.signals`.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from blinker import Signal
from flask import Flask

from . import signals
from .extension import StateManager
from .records import State


@pytest.fixture
def state_app_config() -> dict[str, Any]:
    """Config for ``state_app``; override this fixture to choose a store."""
    return {"TESTING": True, "STATEMANAGER_STORE": "memory"}


@pytest.fixture
def state_app(state_app_config: dict[str, Any], tmp_path: Path) -> Iterator[Flask]:
    """A Flask app with a freshly reset StateManager initialised on it, on an
    empty store; receivers the test connects are disconnected after it."""
    StateManager.reset_instance()
    app = Flask("statemanager_test_app", instance_path=str(tmp_path / "instance"))
    app.config.update(state_app_config)
    manager = StateManager()
    manager.init_app(app)
    with app.app_context():
        if manager.store.kind != "memory":
            manager.create_all()
            manager.store.reset()
    before = _receivers()
    try:
        yield app
    finally:
        _disconnect_new(before)
        StateManager.reset_instance()


def _signals() -> list[Signal]:
    return [value for value in vars(signals).values() if isinstance(value, Signal)]


def _receivers() -> dict[Signal, set[Any]]:
    """The receiver ids connected to each of the extension's signals."""
    return {signal: set(signal.receivers) for signal in _signals()}


def _disconnect_new(before: dict[Signal, set[Any]]) -> None:
    """Disconnect every receiver connected since :func:`_receivers` returned *before*."""
    for signal in _signals():
        for receiver_id in set(signal.receivers) - before.get(signal, set()):
            receiver = signal.receivers.get(receiver_id)
            if isinstance(receiver, weakref.ref):
                receiver = receiver()
            if receiver is not None:
                signal.disconnect(receiver)


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
