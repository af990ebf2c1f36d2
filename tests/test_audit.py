"""Tamper-evident history: edits made behind the application's back are found.

Each test alters the stored rows directly — SQL ``UPDATE``/``DELETE``, Redis
``LSET``/``SET``, the memory store's dicts — the way someone with database
access would, then checks that ``verify_history`` and ``flask states verify``
name the first broken entry.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
import redis
import sqlalchemy as sa
from flask import Flask

from flask_statemanager import StateManager
from flask_statemanager.audit import BrokenLink, canonical, chain_hash
from flask_statemanager.records import Change
from flask_statemanager.stores.base import Store
from flask_statemanager.stores.cache import CachedStore
from flask_statemanager.stores.memory import MemoryStore
from flask_statemanager.stores.redis import RedisStore
from flask_statemanager.stores.sql import SQLStore

from .conftest import make_app

STORES = ["memory", "sqlite", "postgres", "postgres+cache", "redis"]


@pytest.fixture(params=STORES)
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Flask]:
    kind = request.param
    config: dict[str, Any] = {}
    if kind == "memory":
        config["STATEMANAGER_STORE"] = "memory"
    if kind.startswith("postgres"):
        config["STATEMANAGER_DATABASE_URI"] = request.getfixturevalue("postgres_url")
    if kind in ("postgres+cache", "redis"):
        config["STATEMANAGER_REDIS_URL"] = request.getfixturevalue("clean_redis")
    if kind == "redis":
        config["STATEMANAGER_STORE"] = "redis"
    app = make_app(tmp_path, **config)
    manager = StateManager()
    manager.register_type("user")
    manager.init_app(app)
    with app.app_context():
        manager.create_all()
        manager.store.reset()
        manager.register_state("a", "user", {"data": {"n": 1}})
        for n in range(2, 6):
            manager.update_state("a", {"data": {"n": n}})
        manager.register_state("b", "user", {"data": {"n": 0}})
        manager.delete_state("b")
    yield app


@pytest.fixture
def sm(app: Flask) -> Iterator[StateManager]:
    with app.app_context():
        yield StateManager()


def broken(sm: StateManager) -> list[BrokenLink]:
    return [r for r in sm.verify_history() if isinstance(r, BrokenLink)]


# -- raw edits, one way per store ---------------------------------------------------------


def _sql(store: Store) -> SQLStore | None:
    inner = store.inner if isinstance(store, CachedStore) else store
    return inner if isinstance(inner, SQLStore) else None


def edit_entry(store: Store, state_id: str, version: int, new_data: dict[str, Any]) -> None:
    """Change the ``new_data`` of one stored history entry, as a database user could."""
    sql = _sql(store)
    if sql is not None:
        h = sql.history_table
        with sql.engine.begin() as conn:
            conn.execute(
                sa.update(h)
                .where(h.c.state_id == state_id, h.c.version == version)
                .values(new_data=new_data)
            )
    elif isinstance(store, RedisStore):
        key = store.history_key(state_id)
        client: redis.Redis = store.client
        entry = orjson.loads(client.lindex(key, version - 1))
        entry["new_data"] = new_data
        client.lset(key, version - 1, orjson.dumps(entry))
    else:
        assert isinstance(store, MemoryStore)
        store._history[state_id][version - 1]["new_data"] = new_data


def drop_entry(store: Store, state_id: str, version: int) -> None:
    sql = _sql(store)
    if sql is not None:
        h = sql.history_table
        with sql.engine.begin() as conn:
            conn.execute(sa.delete(h).where(h.c.state_id == state_id, h.c.version == version))
    elif isinstance(store, RedisStore):
        key = store.history_key(state_id)
        store.client.lset(key, version - 1, b"doomed")
        store.client.lrem(key, 1, b"doomed")
    else:
        assert isinstance(store, MemoryStore)
        del store._history[state_id][version - 1]


def edit_state(store: Store, state_id: str, data: dict[str, Any]) -> None:
    sql = _sql(store)
    if sql is not None:
        s = sql.states
        with sql.engine.begin() as conn:
            conn.execute(sa.update(s).where(s.c.state_id == state_id).values(data=data))
    elif isinstance(store, RedisStore):
        key = store.state_key(state_id)
        document = orjson.loads(store.client.get(key))
        document["data"] = data
        store.client.set(key, orjson.dumps(document))
    else:
        assert isinstance(store, MemoryStore)
        store._states[state_id]["data"] = data


# -- tests ----------------------------------------------------------------------------------


def test_an_intact_history_verifies(sm: StateManager) -> None:
    assert list(sm.verify_history()) == ["a", "b"]
    assert broken(sm) == []
    assert sm.get_metrics()["operations"]["verify_history"] == 2  # counted like any operation


@pytest.mark.parametrize("version", [1, 3, 5])
def test_an_edited_entry_breaks_the_chain_there(sm: StateManager, version: int) -> None:
    edit_entry(sm.store, "a", version, {"n": 1000})
    (link,) = broken(sm)
    assert (link.state_id, link.version) == ("a", version)
    assert "altered" in link.reason
    assert str(link).startswith(f"a: version {version}: ")


def test_an_entry_edited_back_and_forth_is_found_at_the_first_edit(sm: StateManager) -> None:
    # Rewriting an entry and re-hashing it by hand does not help: the next link breaks.
    edit_entry(sm.store, "a", 2, {"n": 2000})
    edit_entry(sm.store, "a", 4, {"n": 4000})
    (link,) = broken(sm)
    assert link.version == 2


def test_a_removed_entry_is_found(sm: StateManager) -> None:
    drop_entry(sm.store, "a", 3)
    (link,) = broken(sm)
    assert link.state_id == "a" and link.version == 4
    assert "missing" in link.reason


def test_a_state_record_that_disagrees_with_its_history_is_found(sm: StateManager) -> None:
    edit_state(sm.store, "a", {"n": 5, "extra": True})
    (link,) = broken(sm)
    assert link.state_id == "a" and link.version is None
    assert "differs" in link.reason


def test_verify_command(app: Flask, sm: StateManager) -> None:
    runner = app.test_cli_runner()
    ok = runner.invoke(args=["states", "verify"])
    assert ok.exit_code == 0, ok.output
    assert "History intact: 2 state(s) verified." in ok.output
    edit_entry(sm.store, "a", 3, {"n": -3})
    bad = runner.invoke(args=["states", "verify"])
    assert bad.exit_code == 1
    assert "BROKEN a: version 3:" in bad.output
    assert "1 of 2 state histories fail to verify" in bad.output
    one = runner.invoke(args=["states", "verify", "b"])
    assert one.exit_code == 0 and "1 state(s) verified" in one.output
    invalid = runner.invoke(args=["states", "verify", "bad id!"])
    assert invalid.exit_code == 1 and "Invalid state_id" in invalid.output
    unknown = runner.invoke(args=["states", "verify", "nobody"])
    assert unknown.exit_code == 1 and "nobody" in unknown.output
    assert "verified" not in unknown.output


def test_changes_carry_their_hash_through_every_read(sm: StateManager) -> None:
    history = sm.get_state_history("a")
    assert all(len(c["hash"]) == 64 for c in history)
    assert len({c["hash"] for c in history}) == 5
    recent = sm.get_recent_changes("a", limit=5)
    assert [c["hash"] for c in recent] == [c["hash"] for c in reversed(history)]
    assert sm.get_changes_by_transition("a", "update") == history[1:]


@pytest.mark.parametrize("microsecond", [0, 1, 123456])
def test_a_hash_covers_the_instant_not_the_zone_it_is_given_in(microsecond: int) -> None:
    """Entries the engine writes (UTC) and entries imported with another zone
    hash alike: timestamps are written as ISO-8601 UTC with a ``Z``."""
    at = datetime(2026, 3, 29, 1, 30, 5, microsecond, tzinfo=UTC)
    utc = Change(
        change_id="c" * 32,
        state_id="a",
        version=1,
        transition="create",
        old_data=None,
        new_data={"n": -0.0},
        actor=None,
        metadata={"from_status": None, "to_status": "pending"},
        created_at=at,
        hash=None,
    )
    zoned = Change(utc, created_at=at.astimezone(ZoneInfo("Europe/Berlin")))
    stamp = at.isoformat()[:-6] + "Z"
    assert f'"created_at":"{stamp}"'.encode() in canonical(utc)
    assert canonical(utc) == canonical(zoned)
    assert b'"new_data":{"n":0.0}' in canonical(utc)
    assert chain_hash("f" * 64, utc) == chain_hash("f" * 64, zoned)
