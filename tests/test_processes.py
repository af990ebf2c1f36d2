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
import sqlalchemy as sa
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
    """Read the state row and its history in one snapshot and check they agree.

    One snapshot matters: a killed writer may have sent COMMIT just before it
    died, and the server applies it a moment later.
    """
    with app.app_context():
        store = StateManager().store
    engine = store.engine  # type: ignore[attr-defined]
    isolation = "REPEATABLE READ" if engine.dialect.name == "postgresql" else "SERIALIZABLE"
    with engine.connect().execution_options(isolation_level=isolation) as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN")
        version, data = conn.execute(
            sa.select(store.states.c.version, store.states.c.data).where(  # type: ignore[attr-defined]
                store.states.c.state_id == state_id
            )  # type: ignore[attr-defined]
        ).one()
        h = store.history_table  # type: ignore[attr-defined]
        rows = conn.execute(
            sa.select(h.c.version, h.c.new_data)
            .where(h.c.state_id == state_id)
            .order_by(h.c.version)
        ).all()
    assert [r.version for r in rows] == list(range(1, version + 1))
    assert rows[-1].new_data == data
    return int(version)


def test_four_processes_fifty_atomic_increments(
    database: tuple[str, Flask], tmp_path: Path
) -> None:
    uri, app = database
    config = {"STATEMANAGER_DATABASE_URI": uri}
    with app.app_context():
        StateManager().register_state("counter", "user", {"data": {"count": 0}})
    with spawn.Pool(4) as pool:
        failures = pool.starmap(
            workers.increment, [(config, str(tmp_path / "instance"), "counter", 50)] * 4
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
    assert all(c["new_data"]["count"] == c["old_data"]["count"] + 1 for c in history[1:])
    # Writers that queued for the row lock chained to the entry just committed.
    with app.app_context():
        assert list(StateManager().verify_history("counter")) == ["counter"]


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
            args=({"STATEMANAGER_DATABASE_URI": uri}, str(tmp_path / "instance"), "victim", ready),
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
    with app.app_context():
        assert list(StateManager().verify_history("victim")) == ["victim"]


def test_change_ids_do_not_depend_on_the_application_s_random(tmp_path: Path) -> None:
    """An app (or a test plugin) seeding :mod:`random` never makes a change id repeat."""
    app = make_app(tmp_path, STATEMANAGER_STORE="memory")
    sm = StateManager()
    sm.init_app(app)
    with app.app_context():
        sm.register_state("s", "user", {"data": {}})
        for n in range(3):
            random.seed(42)  # e.g. per request, for a reproducible draw
            sm.update_state("s", {"data": {"n": n}})
        ids = [c["change_id"] for c in sm.get_state_history("s")]
    assert len(set(ids)) == 4


def test_change_ids_are_uuid4_and_unique_across_forked_workers(tmp_path: Path) -> None:
    """Workers forked from one app (gunicorn's pre-fork model) never repeat a change id."""
    import uuid

    app = make_app(tmp_path, STATEMANAGER_STORE="memory")
    sm = StateManager()
    sm.init_app(app)
    with app.app_context():
        sm.register_state("parent", "user", {"data": {}})  # ids made before the fork
    readers = []
    for _ in range(2):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one app, forked, writes and reports its ids
            os.close(read_end)
            with app.app_context():
                for n in range(20):
                    sm.update_state("parent", {"data": {"n": n}})
                ids = [c["change_id"] for c in sm.get_state_history("parent")[1:]]
            os.write(write_end, " ".join(ids).encode())
            os._exit(0)
        os.close(write_end)
        readers.append((pid, read_end))
    seen: list[str] = []
    for pid, read_end in readers:
        with os.fdopen(read_end) as pipe:
            seen += pipe.read().split()
        assert os.waitpid(pid, 0)[1] == 0
    assert len(seen) == 40 and len(set(seen)) == 40
    for change_id in seen:
        parsed = uuid.UUID(hex=change_id)
        assert (parsed.version, parsed.variant, parsed.hex) == (4, uuid.RFC_4122, change_id)
