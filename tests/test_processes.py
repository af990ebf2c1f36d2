"""Correctness across OS processes: contiguous versions and crash safety on SQL stores."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from flask_statemanager import StateManager

from . import workers
from .conftest import make_app

pytestmark = pytest.mark.slow
spawn = multiprocessing.get_context("spawn")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Flask]]:
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    else:
        uri = request.getfixturevalue("postgres_url")
    app = make_app(tmp_path, STATEMANAGER_DATABASE_URI=uri)
    StateManager().init_app(app)
    with app.app_context():
        StateManager().create_all()
        StateManager().store.reset()
    yield uri, app


def _assert_consistent(app: Flask, state_id: str) -> int:
    with app.app_context():
        state = StateManager().get_state(state_id)
        history = StateManager().get_state_history(state_id)
    assert state is not None
    assert [c["version"] for c in history] == list(range(1, state["version"] + 1))
    assert history[-1]["new_data"] == state["data"]
    return int(state["version"])


def test_four_processes_fifty_atomic_increments(
    database: tuple[str, Flask], tmp_path: Path
) -> None:
    uri, app = database
    with app.app_context():
        StateManager().register_state("counter", "user", {"data": {"count": 0}})
    with spawn.Pool(4) as pool:
        failures = pool.starmap(
            workers.increment, [(uri, str(tmp_path / "instance"), "counter", 50)] * 4
        )
    assert failures == [0, 0, 0, 0]
    with app.app_context():
        state = StateManager().get_state("counter")
        history = StateManager().get_state_history("counter")
    assert state["data"]["count"] == 200
    assert state["version"] == 201
    assert len(history) == 201
    assert [c["version"] for c in history] == list(range(1, 202))
    # Every increment is its own change: old and new counts step by one.
    assert all(
        c["new_data"]["count"] == c["old_data"]["count"] + 1 for c in history[1:]
    )


def test_sigkill_mid_write_never_splits_state_and_history(
    database: tuple[str, Flask], tmp_path: Path
) -> None:
    uri, app = database
    with app.app_context():
        StateManager().register_state("victim", "user", {"data": {"n": 0}})
    rng = random.Random(1234)
    for _ in range(8):
        ready = spawn.Event()
        proc = spawn.Process(
            target=workers.write_forever,
            args=(uri, str(tmp_path / "instance"), "victim", ready),
        )
        proc.start()
        assert ready.wait(30)
        time.sleep(rng.uniform(0.05, 0.3))
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        _assert_consistent(app, "victim")
    version = _assert_consistent(app, "victim")
    assert version > 8  # the writers really wrote between the kills
