"""Multi-state writes racing other writers, on the stores whose writers can
overlap: PostgreSQL (alone and behind the Redis cache) and Redis.

Each race is staged with events, barriers and the server's own lock view, not
with long loops: a validator of the batch (which runs while the batch is being
planned) lets the other writer in at a chosen moment. What is asserted is what
a user sees: outcomes, errors, versions and the states left.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_statemanager import (
    State,
    StateExistsError,
    StateLimitError,
    StateManager,
    StateManagerError,
)

from .conftest import make_app

PG_STORES = ["postgresql", "postgresql+cache"]


def doc(**data: Any) -> dict[str, Any]:
    return {"data": data}


@pytest.fixture
def store_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    kind = request.param
    if kind == "redis":
        return {
            "STATEMANAGER_STORE": "redis",
            "STATEMANAGER_REDIS_URL": request.getfixturevalue("clean_redis"),
        }
    config = {"STATEMANAGER_DATABASE_URI": request.getfixturevalue("postgres_url")}
    if kind == "postgresql+cache":
        config["STATEMANAGER_REDIS_URL"] = request.getfixturevalue("clean_redis")
    return config


@pytest.fixture
def build(tmp_path: Path, store_config: dict[str, Any]) -> Callable[[], Flask]:
    """Build the app after the test registered its types and validators."""

    def make() -> Flask:
        app = make_app(tmp_path, **store_config)
        StateManager().init_app(app)
        with app.app_context():
            StateManager().create_all()
            StateManager().store.reset()
        return app

    return make


def in_thread(app: Flask, work: Callable[[], Any]) -> Any:
    """Run *work* in another thread (another writer) and return what it returned or raised."""
    result: list[Any] = []

    def run() -> None:
        with app.app_context():
            try:
                result.append(work())
            except StateManagerError as exc:
                result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the other writer never finished"
    return result[0]


def ids(sm: StateManager, type_name: str) -> list[str]:
    return sorted(s["state_id"] for s in sm.search_states(type_name, per_page=100))


@pytest.mark.parametrize("store_config", ["redis"], indirect=True)
def test_a_bulk_registration_keeps_what_fits_when_another_writer_fills_the_type(
    build: Callable[[], Flask],
) -> None:
    """Redis counts again as it commits: a lost count re-plans, it does not refuse all."""
    sm = StateManager()
    sm.register_type("slot", max_states=2)
    #: The creation of a2 (t2) lets another writer register b1 (b2) first, once.
    arm = {"a2": "b1", "t2": "b2"}
    raced: list[Any] = []

    def racer(state: State, transition: str) -> None:
        other = arm.pop(state["state_id"], None)
        if other is not None:
            raced.append(in_thread(app, lambda: sm.register_state(other, "slot", doc())))

    sm.register_validator("slot", racer, transitions=["create"])
    app = build()
    with app.app_context():
        result = sm.bulk_register(
            [{"state_id": i, "state_type": "slot", "initial_data": doc()} for i in ("a1", "a2")]
        )
        assert isinstance(raced[0], State)  # the other writer registered b1 meanwhile
        assert isinstance(result.outcomes[0], State) and result.outcomes[0]["version"] == 1
        refused = result.outcomes[1]
        assert isinstance(refused, StateLimitError) and refused.maximum == 2
        assert "'a2'" in str(refused) and "meanwhile" not in str(refused)
        assert ids(sm, "slot") == ["a1", "b1"]
        assert sm.store.get("a2") is None and sm.get_state_history("a2") == []
        # Without partial outcomes the batch is still refused whole.
        sm.delete_state("b1")  # room for one: t1 fits, t2 does not once b2 is in
        with pytest.raises(StateLimitError), sm.transaction() as tx:
            tx.register_state("t1", "slot", doc())
            tx.register_state("t2", "slot", doc())
        assert isinstance(raced[1], State)
        assert ids(sm, "slot") == ["a1", "b2"]
        assert sm.store.get("t1") is None


@pytest.mark.parametrize("store_config", PG_STORES, indirect=True)
def test_an_id_registered_meanwhile_is_reported_for_that_id(build: Callable[[], Flask]) -> None:
    """Not as a conflict of another state of the batch that carries expected_version."""
    sm = StateManager()
    arm = {"new": "other"}

    def racer(state: State, transition: str) -> None:
        by = arm.pop(state["state_id"], None)
        if by is not None:
            in_thread(app, lambda: sm.register_state("new", "user", doc(by=by)))

    sm.register_validator("user", racer, transitions=["create"])
    app = build()
    with app.app_context():
        sm.register_state("a", "user", doc(n=1))
        with pytest.raises(StateExistsError) as caught, sm.transaction() as tx:
            tx.update_state("a", doc(n=2), expected_version=1)
            tx.register_state("new", "user", doc(by="tx"))
        assert caught.value.state_id == "new"
        assert sm.get_state("a")["version"] == 1 and sm.get_state("a")["data"] == {"n": 1}
        assert sm.get_state("new")["data"] == {"by": "other"}
        assert [c["version"] for c in sm.get_state_history("new")] == [1]
        assert [c["version"] for c in sm.get_state_history("a")] == [1]


@pytest.mark.parametrize("store_config", PG_STORES, indirect=True)
def test_creations_in_two_limited_types_in_opposite_orders_both_commit(
    build: Callable[[], Flask],
) -> None:
    """Each batch locks its limited types in one order, so neither waits on the other's."""
    sm = StateManager()
    sm.register_type("ta", max_states=10)
    sm.register_type("tb", max_states=10)
    # Both batches meet here at their second item, if both got that far: each
    # holding what it locked for its first type. Only one may get that far.
    meet = threading.Barrier(2, timeout=2)

    def gate(state: State, transition: str) -> None:
        if state["data"].get("second"):
            try:
                meet.wait()
            except threading.BrokenBarrierError:
                pass

    sm.register_validator("ta", gate)
    sm.register_validator("tb", gate)
    app = build()
    batches = {
        "A": [("a1", "ta", {}), ("a2", "tb", {"second": True})],
        "B": [("b1", "tb", {}), ("b2", "ta", {"second": True})],
    }
    results: dict[str, Any] = {}

    def register(name: str) -> None:
        items = [
            {"state_id": i, "state_type": t, "initial_data": {"data": d}}
            for i, t, d in batches[name]
        ]
        results[name] = in_thread(app, lambda: sm.bulk_register(items))

    threads = [threading.Thread(target=register, args=(name,)) for name in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for name in batches:
        assert not isinstance(results[name], StateManagerError), results[name]
        assert [type(o).__name__ for o in results[name].outcomes] == ["State", "State"]
    with app.app_context():
        assert ids(sm, "ta") == ["a1", "b2"] and ids(sm, "tb") == ["a2", "b1"]
        assert all(sm.get_state(i)["version"] == 1 for i in ("a1", "a2", "b1", "b2"))


@pytest.fixture
def database(postgres_url: str) -> Iterator[sa.Engine]:
    """Another client of the test database (to hold row locks the way any client can)."""
    engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://", 1))
    yield engine
    engine.dispose()


def _wait_for_a_lock_wait(database: sa.Engine) -> None:
    """Return once a backend of the test database waits for a lock."""
    waiting = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + 20
    with database.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        while not conn.execute(waiting).scalar_one():
            assert time.monotonic() < deadline, "the batch never waited for the lock"
            time.sleep(0.01)


@pytest.mark.parametrize("store_config", PG_STORES, indirect=True)
def test_a_batch_picked_as_deadlock_victim_runs_again(
    build: Callable[[], Flask], database: sa.Engine
) -> None:
    """PostgreSQL aborts one transaction of a deadlock (40P01): the batch is retried."""
    sm = StateManager()
    app = build()
    with app.app_context():
        sm.register_state("a", "user", doc(n=1))
        sm.register_state("b", "user", doc(n=1))
    states = sa.text("SELECT version FROM statemanager_states WHERE state_id = :id FOR UPDATE")
    with database.connect() as other:
        other.execute(states, {"id": "b"})  # another client holds b...
        done: list[Any] = []

        def batch() -> None:
            def write() -> list[State]:
                with sm.transaction() as tx:
                    tx.update_state("a", doc(n=2))  # ...the batch locks a, then waits for b
                    tx.update_state("b", doc(n=2))
                return tx.results

            done.append(in_thread(app, write))

        writer = threading.Thread(target=batch)
        writer.start()
        _wait_for_a_lock_wait(database)
        # Now the other client wants a: a deadlock. The batch has waited longer,
        # so its deadlock check runs first and PostgreSQL aborts it.
        other.execute(states, {"id": "a"})
        other.rollback()
        writer.join(30)
    assert [(s["state_id"], s["version"]) for s in done[0]] == [("a", 2), ("b", 2)]
    with app.app_context():
        assert [c["version"] for c in sm.get_state_history("a")] == [1, 2]
        assert sm.get_state("b")["data"] == {"n": 2}
