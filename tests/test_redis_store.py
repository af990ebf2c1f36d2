"""The Redis store: the whole store contract, plus what is Redis's own.

Its keys and their hash tags, searches that never use KEYS or SCAN, locks,
tombstones that Redis drops natively, indexes declared after the fact, many
OS processes writing one state, a writer killed mid-write, and a server that
does not answer.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
import redis
import redis.cache
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from flask_statemanager import BackendUnavailableError, StateManager, codec
from flask_statemanager.audit import seal
from flask_statemanager.query import COLUMNS, matches, parse_conditions
from flask_statemanager.records import Change, State
from flask_statemanager.stores.base import Retention, Write
from flask_statemanager.stores.redis import RedisStore
from flask_statemanager.stores.redis_calls import pack
from flask_statemanager.stores.redis_records import encode_document, utc_stamp

from . import workers
from .conftest import make_app
from .test_contract import StoreContract, user
from .test_search_properties import _documents, filters

spawn = multiprocessing.get_context("spawn")
UNREACHABLE = "redis://127.0.0.1:9/0"  # the discard port: nothing listens


class TestRedisStore(StoreContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path, clean_redis: str) -> dict[str, Any]:
        return {"STATEMANAGER_STORE": "redis", "STATEMANAGER_REDIS_URL": clean_redis}


@pytest.fixture
def app(tmp_path: Path, clean_redis: str) -> Iterator[Flask]:
    app = make_app(tmp_path, STATEMANAGER_STORE="redis", STATEMANAGER_REDIS_URL=clean_redis)
    manager = StateManager()
    manager.register_type("user", indexes=["data.status", "data.age"])
    manager.init_app(app)
    with app.app_context():
        manager.create_all()
        manager.store.reset()
    yield app


@pytest.fixture
def sm(app: Flask) -> Iterator[StateManager]:
    with app.app_context():
        yield StateManager()


@pytest.fixture
def store(sm: StateManager) -> RedisStore:
    assert isinstance(sm.store, RedisStore)
    return sm.store


@pytest.fixture
def client(clean_redis: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(clean_redis)
    yield client
    client.close()


def _app_on(tmp_path: Path, client: redis.Redis) -> tuple[Flask, StateManager]:
    """An app whose Redis store uses the application's own *client* (``redis_manager``)."""
    manager = StateManager(redis_manager=client)
    manager.register_type("user", indexes=["data.status"])
    app = make_app(tmp_path, STATEMANAGER_STORE="redis")
    manager.init_app(app)
    return app, manager


def _swap_store(app: Flask, **options: Any) -> RedisStore:
    """Give *app* a Redis store built with *options* (on the same server)."""
    runtime = app.extensions["statemanager"]
    runtime.store.close()
    url = app.config["STATEMANAGER_REDIS_URL"]
    runtime.store = RedisStore(redis.Redis.from_url(url), prefix="statemanager", **options)
    assert isinstance(runtime.store, RedisStore)
    return runtime.store


def _calls(client: redis.Redis, command: str) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


# -- keys -------------------------------------------------------------------------


def test_key_scheme(sm: StateManager, store: RedisStore, client: redis.Redis) -> None:
    sm.register_state("u1", "user", user(status="active"))
    sm.register_state("s1", "session", {"data": {}}, ttl=3600)
    sm.register_state("gone", "user", user())
    sm.delete_state("gone")
    keys = {k.decode() for k in client.scan_iter(match="statemanager:*")}
    assert keys == {
        "statemanager:state:{u1}",
        "statemanager:history:{u1}",
        "statemanager:state:{s1}",
        "statemanager:history:{s1}",
        "statemanager:state:{gone}",
        "statemanager:history:{gone}",
        "statemanager:type:user",
        "statemanager:type:session",
        "statemanager:expiry:session",
        "statemanager:tombstones:user",
        "statemanager:index:user:data.status",
        "statemanager:indexes",
        "statemanager:types",
        "statemanager:ids",
        "statemanager:log",
    }
    assert client.zrange("statemanager:ids", 0, -1) == [b"gone", b"s1", b"u1"]
    assert store.state_key("u1") == "statemanager:state:{u1}"
    # One state's keys share a Cluster slot through the {id} hash tag.
    for state_id in ("u1", "a.b:c@d-e_f", "x" * 255):
        slots = {
            key_slot(k(state_id).encode())
            for k in (store.state_key, store.history_key, store.lock_key, store.pruned_key)
        }
        assert len(slots) == 1
    assert client.type("statemanager:state:{u1}") == b"string"
    assert client.type("statemanager:history:{u1}") == b"list"
    assert client.llen("statemanager:history:{gone}") == 2
    # Live documents have no Redis expiry; tombstones do; history never.
    assert client.pttl("statemanager:state:{u1}") == -1
    assert client.pttl("statemanager:state:{s1}") == -1
    assert client.pttl("statemanager:state:{gone}") > 0
    assert client.pttl("statemanager:history:{gone}") == -1
    assert client.zrange("statemanager:type:user", 0, -1) == [b"u1"]
    assert client.zrange("statemanager:expiry:session", 0, -1) == [b"s1"]
    assert client.zrange("statemanager:index:user:data.status", 0, -1) == [b"sactive\x00u1"]
    # Each log entry names the state, the version and the change id.
    changes = [
        (i, c["version"], c["change_id"])
        for i in ("u1", "s1", "gone")
        for c in sm.get_state_history(i)
    ]
    assert client.lrange("statemanager:log", 0, -1) == [
        f"{i} {v} {c}".encode() for i, v, c in changes
    ]
    # Timestamps have one fixed width, so that they compare as strings.
    doc = client.get("statemanager:state:{s1}")
    assert doc is not None
    stamps = [v for k, v in _loads(doc).items() if k.endswith("_at")]
    assert len(stamps) == 3 and all(len(s) == 27 and s.endswith("Z") for s in stamps)


def test_restore_keeps_the_key_invariants(
    sm: StateManager, store: RedisStore, client: redis.Redis
) -> None:
    sm.register_state("u1", "user", user(status="active"))
    sm.register_state("s1", "session", {"data": {}}, ttl=3600)
    sm.transition("s1", "activate")
    sm.register_state("gone", "user", user(status="x"))
    sm.delete_state("gone")
    saved = {i: (store.get(i), store.history(i)) for i in ("u1", "s1", "gone")}
    before = {k: client.dump(k) for k in client.scan_iter(match="statemanager:*")}
    keys = set(before) - {b"statemanager:log"}
    store.reset()
    for state, history in saved.values():
        assert state is not None
        store.restore(state, history)
    after = {k: client.dump(k) for k in client.scan_iter(match="statemanager:*")}
    # The same keys with the same values: documents, histories, every index.
    assert {k: after[k] for k in keys} == {k: before[k] for k in keys}
    assert client.pttl("statemanager:state:{gone}") > 0
    assert client.pttl("statemanager:state:{s1}") == -1
    restored = [c for _, history in saved.values() for c in history]
    assert client.lrange("statemanager:log", 0, -1) == [
        f"{c['state_id']} {c['version']} {c['change_id']}".encode() for c in restored
    ]
    # Replacing a live state by a tombstone takes it out of every index.
    gone_state, gone_history = saved["gone"]
    assert gone_state is not None
    tombstone = State(gone_state, state_id="u1")
    store.restore(tombstone, [Change(c, state_id="u1") for c in gone_history], replace=True)
    assert client.zrange("statemanager:type:user", 0, -1) == []
    assert client.zrange("statemanager:index:user:data.status", 0, -1) == []
    assert client.llen("statemanager:history:{u1}") == 2
    assert client.pttl("statemanager:state:{u1}") > 0


def test_restore_waits_for_a_writers_lock(
    sm: StateManager, store: RedisStore, client: redis.Redis
) -> None:
    sm.register_state("u1", "user", user(n=1))
    state, history = store.get("u1"), store.history("u1")
    assert state is not None
    client.set("statemanager:lock:{u1}", "a writer", px=200)
    start = time.monotonic()
    store.restore(state, history, replace=True)
    assert time.monotonic() - start >= 0.15
    assert store.history("u1") == history


def _loads(raw: bytes) -> dict[str, Any]:
    return dict(orjson.loads(raw))


def test_reset_deletes_only_this_stores_keys(sm: StateManager, client: redis.Redis) -> None:
    sm.register_state("u1", "user", user())
    client.set("statemanager:cache:state:{u1}", "a cache entry")
    client.set("other:state:{u1}", "another prefix")
    sm.store.reset()
    left = sorted(k.decode() for k in client.scan_iter())
    assert left == ["other:state:{u1}", "statemanager:cache:state:{u1}", "statemanager:indexes"]
    assert sm.search_states("user", {"data.status": "x"}).total == 0


def test_key_prefix(tmp_path: Path, clean_redis: str, client: redis.Redis) -> None:
    app = make_app(
        tmp_path,
        STATEMANAGER_STORE="redis",
        STATEMANAGER_REDIS_URL=clean_redis,
        STATEMANAGER_KEY_PREFIX="app*1",
    )
    StateManager().init_app(app)
    with app.app_context():
        StateManager().register_state("u1", "user", user())
        client.set("app11:state:{u1}", "not ours, though the glob would match")
        assert client.exists("app*1:state:{u1}", "app*1:history:{u1}") == 2
        StateManager().store.reset()
    assert [k.decode() for k in client.scan_iter()] == ["app11:state:{u1}"]


# -- search -----------------------------------------------------------------------


def test_search_never_uses_keys_or_scan(sm: StateManager, client: redis.Redis) -> None:
    for i in range(30):
        sm.register_state(f"u{i}", "user", user(status="active" if i % 3 else "new", age=i))
    sm.register_state("f1", "feature", {"data": {"status": "active"}})
    searches: list[tuple[Any, dict[str, Any] | None]] = [
        ("user", None),
        (None, None),
        ("user", {"data.status": "active"}),
        ("user", {"data.status__in": ["new", "gone"], "data.age__gte": 10}),
        ("user", {"data.age__lt": 5}),
        (None, {"data.status": "active"}),
    ]
    before = {c: _calls(client, c) for c in ("keys", "scan", "zscan", "zrangebylex")}
    totals = [sm.search_states(t, f).total for t, f in searches]
    after = {c: _calls(client, c) for c in before}
    assert totals == [30, 31, 20, 6, 5, 21]
    assert after["keys"] == before["keys"]
    assert after["scan"] == before["scan"]
    assert after["zscan"] == before["zscan"]
    # The two searches with an equality on a declared field read its index.
    assert after["zrangebylex"] - before["zrangebylex"] == 1 + 2


def test_search_bounds_in_the_hour_a_clock_goes_back_are_told_apart(sm: StateManager) -> None:
    """02:30 Berlin happens twice on 2027-10-31 (fold 0 is 00:30Z, fold 1 is 01:30Z):
    the two compare equal in Python, but a filter on each must mean its own instant."""
    berlin = ZoneInfo("Europe/Berlin")
    first = datetime(2027, 10, 31, 2, 30, tzinfo=berlin)
    second = first.replace(fold=1)
    expires = datetime(2027, 10, 31, 1, 0, tzinfo=UTC)  # between the two
    sm.register_state("x", "user", user(), ttl=(expires - datetime.now(UTC)).total_seconds())
    found = [
        [s["state_id"] for s in sm.search_states("user", {"expires_at__gt": bound}).items]
        for bound in (first, second, first)
    ]
    assert found == [["x"], [], ["x"]]


def test_search_orders_like_the_reference(sm: StateManager) -> None:
    rng = random.Random(3)
    for i in range(25):
        state_id = f"s{rng.randint(0, 99):02d}_{i}"
        sm.register_state(
            state_id,
            "user",
            {"name": rng.choice(["b", "a", "B", "é", "ab"]), "data": {}},
            ttl=rng.choice([None, 60, 120]),
        )
        if rng.random() < 0.4:
            sm.transition(state_id, "activate")
    everything = list(sm.search_states("user", per_page=500))
    assert len(everything) == 25
    for column in sorted(COLUMNS):
        for descending in (False, True):
            order_by = ("-" if descending else "") + column
            expected = _reference_order(everything, column, descending)
            found = list(sm.search_states("user", per_page=500, order_by=order_by))
            assert [s["state_id"] for s in found] == [s["state_id"] for s in expected], order_by
            paged = [
                s["state_id"]
                for page in range(1, 6)
                for s in sm.search_states("user", page=page, per_page=6, order_by=order_by)
            ]
            assert paged == [s["state_id"] for s in expected], order_by


def _reference_order(records: Sequence[State], column: str, descending: bool) -> list[State]:
    """The memory store's order: by *column*, nulls last, ties by state_id, one direction."""
    rows = sorted(records, key=lambda s: s["state_id"], reverse=descending)
    present = [s for s in rows if s[column] is not None]
    present.sort(key=lambda s: s[column], reverse=descending)
    return present + [s for s in rows if s[column] is None]


def test_text_compares_by_code_point_through_index_and_scan(sm: StateManager) -> None:
    for state_id, status in [("a", "z"), ("b", "é"), ("c", "漢字"), ("d", "Z"), ("e", "ü\u2028")]:
        sm.register_state(state_id, "user", user(status=status, copy=status))
    for field in ("data.status", "data.copy"):  # declared (index) and not (scan)
        assert [s["state_id"] for s in sm.search_states("user", {field: "漢字"})] == ["c"]
        assert [
            s["state_id"]
            for s in sm.search_states("user", {field + "__in": ["é", "Z"]}, order_by="state_id")
        ] == ["b", "d"]
        above = sm.search_states("user", {field + "__gt": "z"}, order_by="state_id")
        assert [s["state_id"] for s in above] == ["b", "c", "e"]


@pytest.mark.parametrize("descending", [True, False])
def test_type_listing_skips_unrecorded_expiries(sm: StateManager, descending: bool) -> None:
    """The sorted-set fast path (no conditions, by updated_at) pages like a full search."""
    rng = random.Random(11)
    for i in range(20):
        sm.register_state(f"s{i:02d}", "session", {"data": {}}, ttl=rng.choice([0.2, None, 60]))
    time.sleep(0.3)
    order_by = "-updated_at" if descending else "updated_at"
    # A condition every state meets takes the general path.
    full = sm.search_states("session", {"version__gte": 1}, per_page=100, order_by=order_by)
    fast = sm.search_states("session", per_page=100, order_by=order_by)
    assert [s["state_id"] for s in fast] == [s["state_id"] for s in full]
    assert fast.total == full.total < 20
    for per_page in (1, 2, 3, 7):
        for page in range(1, full.total // per_page + 3):
            want = sm.search_states(
                "session", {"version__gte": 1}, page=page, per_page=per_page, order_by=order_by
            )
            got = sm.search_states("session", page=page, per_page=per_page, order_by=order_by)
            assert [s["state_id"] for s in got] == [s["state_id"] for s in want]
            assert got.total == want.total


def test_index_declared_after_states_exist(
    tmp_path: Path, sm: StateManager, app: Flask, client: redis.Redis
) -> None:
    sm.register_type("cart")
    for i in range(1200):  # more than one ZSCAN batch
        sm.register_state(f"c{i}", "cart", {"data": {"color": ["red", "blue", 3][i % 3]}})
    sm.delete_state("c0")
    assert not client.exists("statemanager:index:cart:data.color")
    # A second app on the same server declares the field while this one writes.
    other = make_app(
        tmp_path / "other",
        STATEMANAGER_STORE="redis",
        STATEMANAGER_REDIS_URL=app.config["STATEMANAGER_REDIS_URL"],
    )
    StateManager().init_app(other)
    StateManager().register_type("cart", indexes=["data.color"])
    with other.app_context():
        StateManager().create_all()
    # This app loaded the definitions before the field existed: its next write
    # notices the change and maintains the new index too.
    sm.update_state("c3", {"data": {"color": "green"}})
    sm.register_state("c9999", "cart", {"data": {"color": "red"}})
    members = client.zrange("statemanager:index:cart:data.color", 0, -1)
    assert len(members) == 1200
    assert b"sgreen\x00c3" in members and b"sred\x00c3" not in members
    assert b"sred\x00c0" not in members
    before = _calls(client, "zrangebylex")
    reds = sm.search_states("cart", {"data.color": "red"}, per_page=1)
    assert reds.total == 400 - 2 + 1  # c0 deleted, c3 now green, c9999 new
    assert _calls(client, "zrangebylex") == before + 1
    threes = sm.search_states("cart", {"data.color__in": [3, 3.0, True]}, per_page=500)
    assert threes.total == 400 and all(s["data"]["color"] == 3 for s in threes)


# -- writes -----------------------------------------------------------------------


def test_a_resent_commit_is_recognised(sm: StateManager, store: RedisStore) -> None:
    """A commit whose reply was lost and that is sent again does not write twice."""
    sm.register_state("u1", "user", user(n=1))
    seen: dict[str, Any] = {}

    def plan(rows: Mapping[str, State | None], heads: Mapping[str, str | None]) -> list[Write]:
        seen.update(rows)
        row = rows["u1"]
        assert row is not None
        from flask_statemanager.engine import expiry_write

        write = expiry_write(row, row["updated_at"] + timedelta(seconds=1))
        seal([write.change], heads)
        return [write]

    writes = store.apply(["u1"], plan)
    store._commit(
        ["u1"], seen, writes, "another token", read={"u1": None}
    )  # as a resent EVALSHA would
    assert [c["version"] for c in sm.get_state_history("u1")] == [1, 2]
    assert sm.get_state("u1", include_expired=True)["version"] == 2


def test_a_dead_writers_lock_is_waited_out(
    sm: StateManager, app: Flask, client: redis.Redis
) -> None:
    sm.register_state("u1", "user", user(n=1))
    client.set("statemanager:lock:{u1}", "a writer that died", px=300)
    start = time.monotonic()
    assert sm.update_state("u1", user(n=2))["version"] == 2
    assert time.monotonic() - start >= 0.25
    assert not client.exists("statemanager:lock:{u1}")


def test_a_lock_held_too_long_is_an_error(
    sm: StateManager, app: Flask, client: redis.Redis
) -> None:
    _swap_store(app, lock_wait=0.2)
    sm.register_state("u1", "user", user(n=1))
    client.set("statemanager:lock:{u1}", "a slow writer", px=5000)
    with pytest.raises(BackendUnavailableError, match="stayed locked"):
        sm.update_state("u1", user(n=2))
    assert sm.get_state("u1")["version"] == 1
    assert client.get("statemanager:lock:{u1}") == b"a slow writer"


def test_an_expired_lock_falls_back_on_compare_and_set(
    sm: StateManager, app: Flask, client: redis.Redis
) -> None:
    """A writer whose lock expired mid-plan loses to the one that took the state."""
    _swap_store(app, record_cache_size=0)  # every write takes the locks first
    sm.register_state("u1", "user", user(n=1))
    attempts: list[int] = []
    slow = _outlives_its_lock(client, attempts, lambda: _update_in_app(app, sm))
    state = sm.atomic_update("u1", slow)
    assert attempts == [1, 100]
    assert state["data"] == {"n": 110} and state["version"] == 3
    assert [c["version"] for c in sm.get_state_history("u1")] == [1, 2, 3]


def _outlives_its_lock(
    client: redis.Redis, attempts: list[int], meanwhile: Callable[[], None]
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """An atomic_update function whose first run loses u1's lock (as if it expired)
    while *meanwhile* runs in another thread; it notes each ``n`` it is given."""

    def slow(data: dict[str, Any]) -> dict[str, Any]:
        attempts.append(data["n"])
        if len(attempts) == 1:
            client.delete("statemanager:lock:{u1}")  # as if it had expired
            other = threading.Thread(target=meanwhile)
            other.start()
            other.join()
        return {"n": data["n"] + 10}

    return slow


def _update_in_app(app: Flask, sm: StateManager) -> None:
    with app.app_context():
        sm.update_state("u1", user(n=100))


def test_a_writer_that_outlived_its_lock_does_not_write_over_a_new_life(
    sm: StateManager, app: Flask, client: redis.Redis
) -> None:
    """The state was restored and written again meanwhile: its version came back to
    the one the slow writer read, its document did not. The writer plans again."""
    store = _swap_store(app, record_cache_size=0)  # every write takes the locks first
    sm.register_state("u1", "user", user(n=1))
    snapshot, snapshot_history = store.get("u1"), store.history("u1")
    assert snapshot is not None
    sm.update_state("u1", user(n=2))
    attempts: list[int] = []

    def new_life() -> None:
        with app.app_context():
            store.restore(snapshot, snapshot_history, replace=True)  # back to version 1
            sm.update_state("u1", user(n=100))  # version 2 again

    state = sm.atomic_update("u1", _outlives_its_lock(client, attempts, new_life))
    assert attempts == [2, 100]
    assert state["data"] == {"n": 110} and state["version"] == 3
    assert [c["new_data"] for c in sm.get_state_history("u1")] == [
        {"n": 1},
        {"n": 100},
        state["data"],
    ]
    assert list(sm.verify_history("u1")) == ["u1"]


def test_a_restore_over_a_state_given_a_new_life_meanwhile_reads_it_again(
    sm: StateManager,
    app: Flask,
    store: RedisStore,
    client: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another process restored and wrote the state between this restore's read and
    its script, leaving the same history length: the restore plans again, so no index
    keeps a member of the document it did not read."""
    sm.register_state("u1", "user", {"data": {"status": "a"}})
    snapshot, snapshot_history = store.get("u1"), store.history("u1")
    assert snapshot is not None
    sm.update_state("u1", {"data": {"status": "b"}})
    other = workers.make_app(_redis_config(app), str(tmp_path / "other"))
    plan = store._index_operations
    interfered: list[bool] = []

    def interfere(*args: Any, **kwargs: Any) -> Any:
        if not interfered:
            interfered.append(True)
            with other.app_context():
                elsewhere = StateManager()
                elsewhere.store.restore(snapshot, snapshot_history, replace=True)
                elsewhere.update_state("u1", {"data": {"status": "c"}})  # version 2 again
        return plan(*args, **kwargs)

    monkeypatch.setattr(store, "_index_operations", interfere)
    store.restore(snapshot, snapshot_history, replace=True)
    assert interfered
    assert sm.get_state("u1")["data"] == {"status": "a"}
    assert client.zrange("statemanager:index:user:data.status", 0, -1) == [b"sa\x00u1"]
    assert [s["state_id"] for s in sm.search_states("user", {"data.status": "a"})] == ["u1"]
    assert list(sm.verify_history("u1")) == ["u1"]


def test_a_state_written_while_its_new_index_is_built_is_in_it(
    sm: StateManager,
    app: Flask,
    store: RedisStore,
    client: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write between the backfill's read and its script changes a state's version
    (so the backfill skips it) but not its member: the write adds the member itself."""
    for i in range(3):
        sm.register_state(f"s{i}", "user", {"data": {"status": "a", "k": "blue", "n": 0}})
    other = make_app(
        tmp_path / "other",
        STATEMANAGER_STORE="redis",
        STATEMANAGER_REDIS_URL=app.config["STATEMANAGER_REDIS_URL"],
    )
    StateManager().init_app(other)
    StateManager().register_type("user", indexes=["data.status", "data.age", "data.k"])
    builder = other.extensions["statemanager"].store
    run = builder._run
    written: list[bool] = []

    def during_backfill(script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if script == "backfill" and not written:
            written.append(True)
            with app.app_context():  # this app still plans without data.k
                sm.update_state("s1", {"data": {"status": "a", "k": "blue", "n": 1}})
        return run(script, keys, args)

    monkeypatch.setattr(builder, "_run", during_backfill)
    with other.app_context():
        StateManager().create_all()
    assert written
    assert orjson.loads(client.hget("statemanager:indexes", "user") or b"{}")["data.k"] is True
    found = sm.search_states("user", {"data.k": "blue"})
    assert sorted(s["state_id"] for s in found) == ["s0", "s1", "s2"]


def _recent(sm: StateManager, limit: int) -> list[tuple[str, int]]:
    return [(c["state_id"], c["version"]) for c in sm.get_recent_changes(limit=limit)]


def test_recent_changes_list_a_restored_change_once(sm: StateManager, store: RedisStore) -> None:
    sm.register_state("a", "user", user(n=1))
    sm.update_state("a", user(n=2))
    state, history = store.get("a"), store.history("a")
    assert state is not None
    store.restore(state, history, replace=True)  # the same changes, logged again
    assert _recent(sm, 10) == [("a", 2), ("a", 1)]


def test_recent_changes_fill_their_limit_past_purged_states(
    sm: StateManager, store: RedisStore
) -> None:
    sm.register_state("keep", "user", user(n=0))
    for n in range(1, 5):
        sm.update_state("keep", user(n=n))
    sm.register_state("gone", "user", user(n=0))
    for n in range(1, 6):
        sm.update_state("gone", user(n=n))
    sm.delete_state("gone")  # the newest 7 log entries are the gone state's
    list(store.prune("user", Retention(purge_before=datetime.now(UTC) + timedelta(seconds=1))))
    assert store.get("gone") is None
    assert _recent(sm, 3) == [("keep", 5), ("keep", 4), ("keep", 3)]
    assert _recent(sm, 10) == [("keep", v) for v in range(5, 0, -1)]


# -- one round trip from the record cache ---------------------------------------------


def test_repeated_writes_take_one_round_trip(
    sm: StateManager, store: RedisStore, client: redis.Redis
) -> None:
    """Writes planned from this process's last record send only the commit script."""
    sm.register_state("u1", "user", user(n=0))
    sm.register_state("u2", "user", user(n=0))
    before = _calls(client, "evalsha"), _calls(client, "eval")
    for n in range(1, 21):
        sm.update_state("u1", user(n=n))
        sm.atomic_update("u2", lambda d: {**d, "n": d["n"] + 1})
    assert (_calls(client, "evalsha"), _calls(client, "eval")) == (before[0] + 40, before[1])
    assert sm.get_state("u1")["version"] == sm.get_state("u2")["version"] == 21
    assert sm.get_state("u2")["data"]["n"] == 20
    assert not client.keys("statemanager:lock:*")


def test_a_stale_record_cache_still_writes_on_the_fresh_version(
    sm: StateManager, app: Flask, store: RedisStore, client: redis.Redis, tmp_path: Path
) -> None:
    """Another process changed the state: the write lands on its version, nothing lost."""
    sm.register_state("c", "user", {"data": {"count": 0}})
    sm.atomic_update("c", lambda d: {**d, "count": d["count"] + 1})  # record cache: version 2
    other = workers.make_app(_redis_config(app), str(tmp_path / "other"))
    with other.app_context():
        for _ in range(3):
            StateManager().atomic_update("c", lambda d: {**d, "count": d["count"] + 1})
    before = _calls(client, "evalsha")
    state = sm.atomic_update("c", lambda d: {**d, "count": d["count"] + 1})
    # The stale plan was refused, then one read under locks and one commit.
    assert _calls(client, "evalsha") - before == 3
    assert state["version"] == 6 and state["data"]["count"] == 5
    history = sm.get_state_history("c")
    assert [c["version"] for c in history] == list(range(1, 7))
    assert all(c["new_data"]["count"] == c["old_data"]["count"] + 1 for c in history[1:])
    assert _assert_consistent(client, "c") == 6
    before = _calls(client, "evalsha")
    assert sm.atomic_update("c", lambda d: {**d, "count": d["count"] + 1})["version"] == 7
    assert _calls(client, "evalsha") - before == 1  # warm again


def test_a_record_at_the_same_version_but_restored_elsewhere_is_stale(
    sm: StateManager, app: Flask, store: RedisStore, tmp_path: Path
) -> None:
    """A version number that came back (restore --replace, or purge and register
    again, in another process) does not let a remembered record plan a write."""
    sm.register_state("u1", "user", {"data": {"bal": 100}})
    snapshot, snapshot_history = store.get("u1"), store.history("u1")
    sm.update_state("u1", {"data": {"bal": 50}})  # this process remembers v2 {bal: 50}
    other = workers.make_app(_redis_config(app), str(tmp_path / "other"))
    with other.app_context():
        elsewhere = StateManager()
        assert snapshot is not None
        elsewhere.store.restore(snapshot, snapshot_history, replace=True)  # back to v1
        assert elsewhere.patch_state("u1", {"other": 1})["version"] == 2  # v2 again
    patched = sm.patch_state("u1", {"note": "x"})
    # Planned from the fresh v2, not from the remembered one: nothing is lost.
    assert patched["version"] == 3
    assert patched["data"] == {"bal": 100, "other": 1, "note": "x"}
    assert list(sm.verify_history("u1")) == ["u1"]


def test_a_stale_record_after_reset_elsewhere(
    sm: StateManager, app: Flask, store: RedisStore, client: redis.Redis
) -> None:
    """States deleted behind the store's back are planned again from a fresh read
    (the plan from the stale record fails: the state "exists")."""
    sm.register_state("u1", "user", user(n=1))
    sm.update_state("u1", user(n=2))
    other = RedisStore(
        redis.Redis.from_url(app.config["STATEMANAGER_REDIS_URL"]), prefix="statemanager"
    )
    other.reset()
    other.close()
    other.client.close()
    sm.register_state("u1", "user", user(n=3))
    assert [c["version"] for c in sm.get_state_history("u1")] == [1]
    assert sm.update_state("u1", user(n=4))["version"] == 2


# -- tombstones ---------------------------------------------------------------------


def test_dropped_tombstones_keep_history_and_versions(
    sm: StateManager, app: Flask, client: redis.Redis
) -> None:
    _swap_store(app, tombstone_ttl=0.2)
    sm.register_state("d1", "user", user(n=1))
    sm.delete_state("d1")
    sm.register_state("s1", "session", {"data": {"n": 1}}, ttl=0.1)
    time.sleep(0.15)
    assert sm.sweep_expired() == 1
    assert sm.get_state("s1", include_expired=True)["status"] == "expired"
    assert 0 < client.pttl("statemanager:state:{s1}") <= 200
    time.sleep(0.3)
    # Redis dropped both documents; their history stays.
    assert not client.exists("statemanager:state:{d1}", "statemanager:state:{s1}")
    assert sm.get_state("s1", include_expired=True) is None
    assert sm.bulk_get(["d1", "s1"]) == {}
    assert [c["transition"] for c in sm.get_state_history("d1")] == ["create", "delete"]
    assert [c["transition"] for c in sm.get_state_history("s1")] == ["create", "expire"]
    # A new life goes on from the version the history holds.
    assert sm.register_state("d1", "feature", {"data": {"n": 2}})["version"] == 3
    assert sm.register_state("s1", "session", {"data": {"n": 2}})["version"] == 3
    assert [c["version"] for c in sm.get_state_history("s1")] == [1, 2, 3]
    assert client.pttl("statemanager:state:{s1}") == -1
    assert sm.search_states(None).total == 2


# -- several processes ------------------------------------------------------------------


@pytest.mark.slow
def test_four_processes_fifty_atomic_increments(
    sm: StateManager, app: Flask, tmp_path: Path
) -> None:
    sm.register_state("counter", "user", {"data": {"count": 0}})
    config = _redis_config(app)
    with spawn.Pool(4) as pool:
        failures = pool.starmap(
            workers.increment, [(config, str(tmp_path / "instance"), "counter", 50)] * 4
        )
    assert failures == [0, 0, 0, 0]
    state = sm.get_state("counter")
    history = sm.get_state_history("counter")
    assert state["data"]["count"] == 200
    assert state["version"] == 201
    assert [c["version"] for c in history] == list(range(1, 202))
    assert all(c["new_data"]["count"] == c["old_data"]["count"] + 1 for c in history[1:])
    assert list(sm.verify_history("counter")) == ["counter"]


def _assert_consistent(client: redis.Redis, state_id: str) -> int:
    """Read the document and the history in one transaction and check they agree."""
    pipe = client.pipeline(transaction=True)
    pipe.get(f"statemanager:state:{{{state_id}}}")
    pipe.lrange(f"statemanager:history:{{{state_id}}}", 0, -1)
    raw, history = pipe.execute()
    state = _loads(raw)
    changes = [_loads(c) for c in history]
    assert [c["version"] for c in changes] == list(range(1, state["version"] + 1))
    assert changes[-1]["new_data"] == state["data"]
    return int(state["version"])


@pytest.mark.slow
def test_sigkill_mid_write_never_splits_state_and_history(
    sm: StateManager, app: Flask, tmp_path: Path, client: redis.Redis
) -> None:
    sm.register_state("victim", "user", {"data": {"n": 0}})
    config = _redis_config(app)
    rng = random.Random(1234)
    for _ in range(8):
        ready = spawn.Event()
        proc = spawn.Process(
            target=workers.write_forever,
            args=(config, str(tmp_path / "instance"), "victim", ready),
        )
        proc.start()
        assert ready.wait(30)
        time.sleep(rng.uniform(0.05, 0.3))
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        _assert_consistent(client, "victim")
    assert _assert_consistent(client, "victim") > 8
    # The store reads what it wrote, whatever lock the last writer left behind.
    assert sm.update_state("victim", {"data": {"n": -1}})["data"] == {"n": -1}


# -- the connections the scripts run on ----------------------------------------------------


def _history_versions(sm: StateManager, state_id: str) -> list[int]:
    return [c["version"] for c in sm.get_state_history(state_id)]


def test_scripts_run_again_after_the_server_forgot_them(
    sm: StateManager, client: redis.Redis
) -> None:
    """A restarted or flushed server answers NOSCRIPT: the script is loaded and run."""
    sm.register_state("u1", "user", user(n=0))
    client.script_flush()
    sm.update_state("u1", user(n=1))
    client.script_flush()
    assert sm.search_states("user", {"data.n": 1}).total == 1
    assert _history_versions(sm, "u1") == [1, 2]


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, ZoneInfo("Europe/Berlin"), ZoneInfo("UTC")]),
    ),
    st.integers(min_value=0, max_value=2),
)
def test_documents_write_every_timestamp_in_one_fixed_width_utc_form(
    when: datetime, zero_micros: int
) -> None:
    """Timestamps compare as strings in the scripts: always 6 fraction digits, always Z."""
    if zero_micros == 0:
        when = when.replace(microsecond=0)
    state = State.from_columns("s", "s", "user", "active", {}, {}, 1, when, when, None)
    document = orjson.loads(encode_document(state))
    stamp = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").rjust(27, "0")
    assert document["created_at"] == document["updated_at"] == stamp
    assert document["expires_at"] is None
    assert encode_document(state) == codec.dumps_record(state, utc_stamp)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.binary(max_size=7000), st.text(), st.integers(), st.floats(allow_nan=False)),
        max_size=12,
    ),
    st.sampled_from(["utf-8", "utf-16"]),
    st.sampled_from([b"EVALSHA", "MGET", "CLIENT TRACKING", b"SCRIPT LOAD"]),
)
def test_commands_are_packed_as_redis_py_packs_them(
    items: list[Any], encoding: str, name: str | bytes
) -> None:
    """The scripts' own packer sends the bytes redis-py's would, in the client's encoding."""
    connection = redis.Connection(encoding=encoding)
    command = (name, "0" * 40, len(items), *items)
    expected = b"".join(bytes(part) for part in connection.pack_command(*command))
    assert pack(connection.encoder, command) == [expected]


def test_an_applications_own_command_packer_packs_the_scripts_too(app: Flask) -> None:
    """A client built with ``command_packer=`` (hiredis' or the application's)
    encodes every command, the store's scripts included."""
    seen: list[Any] = []

    class Recording(redis.connection.PythonRespSerializer):
        def pack(self, *args: Any) -> Any:
            seen.append(args[0])
            return super().pack(*args)

    url = app.config["STATEMANAGER_REDIS_URL"]
    plain = redis.Connection()
    packer = Recording(plain._buffer_cutoff, plain.encoder.encode)
    shared = redis.Redis(connection_pool=redis.ConnectionPool.from_url(url, command_packer=packer))
    with app.app_context():
        sm = _shared_store(app, shared)
        sm.register_state("u1", "user", user(n=0))
        sm.update_state("u1", user(n=1))
        assert sm.get_state("u1")["version"] == 2
    assert seen.count(b"EVALSHA") >= 2  # at least the two commits
    shared.close()


def test_the_packer_refuses_what_redis_py_refuses() -> None:
    with pytest.raises(redis.DataError):
        pack(redis.Connection().encoder, (b"EVALSHA", "0" * 40, 1, "k", True))


def test_a_kept_connection_the_server_closed_is_replaced_before_use(app: Flask) -> None:
    """CLIENT KILL between two writes: the next write reconnects first, as redis-py's
    pool does, so even a client that never retries does not fail."""
    runtime = app.extensions["statemanager"]
    runtime.store.close()
    runtime.store = RedisStore(
        redis.Redis.from_url(
            app.config["STATEMANAGER_REDIS_URL"],
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        ),
        prefix="statemanager",
        owns_client=True,
    )
    killer = redis.Redis.from_url(app.config["STATEMANAGER_REDIS_URL"])
    with app.app_context():
        sm = StateManager()
        sm.register_state("u1", "user", user(n=0))
        for n in range(1, 4):
            assert killer.client_kill_filter(_type="normal", skipme=True) >= 1
            time.sleep(0.01)  # the server has closed the socket
            sm.update_state("u1", user(n=n))
        assert _history_versions(sm, "u1") == [1, 2, 3, 4]
        assert list(sm.verify_history("u1")) == ["u1"]
    killer.close()


def test_a_call_that_timed_out_leaves_no_reply_for_the_next(
    app: Flask, client: redis.Redis
) -> None:
    """A write times out while Redis is paused; the next calls on the store read
    their own replies, never a late one of the write."""
    url = app.config["STATEMANAGER_REDIS_URL"]
    runtime = app.extensions["statemanager"]
    runtime.store.close()
    runtime.store = RedisStore(
        redis.Redis.from_url(
            url, socket_timeout=0.2, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0)
        ),
        prefix="statemanager",
        owns_client=True,
    )
    with app.app_context():
        sm = StateManager()
        sm.register_state("u1", "user", user(n=0, status="a"))
        sm.register_state("u2", "user", user(n=0, status="b"))
        client.client_pause(600, all=False)  # writes wait, reads answer
        with pytest.raises(BackendUnavailableError):
            sm.update_state("u1", user(n=1, status="a"))
        time.sleep(0.7)  # the pause is over
        page = sm.search_states("user", {"data.status": "b"})
        assert [s["state_id"] for s in page.items] == ["u2"]
        assert sm.update_state("u2", user(n=2, status="b"))["version"] == 2
        assert sm.update_state("u1", user(n=3, status="a"))["data"]["n"] == 3
        version = sm.get_state("u1")["version"]  # 2 or 3: the timed-out write may have landed
        assert _history_versions(sm, "u1") == list(range(1, version + 1))
        assert _history_versions(sm, "u2") == [1, 2]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_use_its_parents_connections(sm: StateManager, app: Flask) -> None:
    """Parent and child write at once after a fork; each gets its own replies."""
    sm.register_state("parent", "user", user(n=0))
    sm.register_state("child", "user", user(n=0))
    sm.update_state("parent", user(n=1))  # the parent now keeps a connection
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if every write read its own reply
        code = 1
        try:
            with app.app_context():
                for n in range(1, 101):
                    assert StateManager().update_state("child", user(n=n))["version"] == n + 1
            code = 0
        finally:
            os._exit(code)
    for n in range(2, 102):
        assert sm.update_state("parent", user(n=n))["version"] == n + 1
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _history_versions(sm, "child") == list(range(1, 102))
    assert _history_versions(sm, "parent") == list(range(1, 103))


@pytest.mark.parametrize("blocking", [False, True])
def test_a_capped_pool_gets_its_connection_back_after_each_call(
    tmp_path: Path, clean_redis: str, blocking: bool
) -> None:
    """An application's client with one connection can use it between the store's calls."""
    pool_class = redis.BlockingConnectionPool if blocking else redis.ConnectionPool
    options = {"timeout": 0.5} if blocking else {}
    shared = redis.Redis(
        connection_pool=pool_class.from_url(clean_redis, max_connections=1, **options)
    )
    app, manager = _app_on(tmp_path, shared)
    with app.app_context():
        manager.create_all()
        manager.register_state("u1", "user", user(n=0))
        for n in range(1, 4):
            manager.update_state("u1", user(n=n))
            assert shared.set("app-key", n)  # would fail: "Too many connections" / timeout
        assert manager.search_states("user").total == 1
        assert shared.get("app-key") == b"3"
    shared.close()


def test_threads_share_the_kept_connections(sm: StateManager, app: Flask) -> None:
    """Twelve threads writing at once (more than the connections kept) each read
    their own replies."""
    ids = [f"t{n}" for n in range(12)]
    for state_id in ids:
        sm.register_state(state_id, "user", user(n=0))
    errors: list[BaseException] = []

    def run(state_id: str) -> None:
        try:
            with app.app_context():
                manager = StateManager()
                for n in range(1, 51):
                    assert manager.update_state(state_id, user(n=n))["version"] == n + 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(state_id,)) for state_id in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for state_id in ids:
        assert _history_versions(sm, state_id) == list(range(1, 52))


class _Interrupted(BaseException):
    """Stands for a gevent.Timeout or KeyboardInterrupt arriving at a bad moment."""


def _shared_store(app: Flask, client: redis.Redis) -> StateManager:
    """Give *app* a Redis store on the application's own *client*."""
    runtime = app.extensions["statemanager"]
    runtime.store.close()
    runtime.store = RedisStore(client, prefix="statemanager")
    return StateManager()


def test_an_interrupted_connection_check_gives_the_connection_back(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted while checking a kept connection, a call still returns it to the
    pool: the application's client never runs out of connections."""
    from flask_statemanager.stores import redis_calls

    shared = redis.Redis(
        connection_pool=redis.ConnectionPool.from_url(
            app.config["STATEMANAGER_REDIS_URL"], max_connections=8
        )
    )
    check = redis_calls._check

    def interrupted(connection: Any) -> None:
        check(connection)
        raise _Interrupted

    with app.app_context():
        sm = _shared_store(app, shared)
        sm.register_state("u1", "user", user(n=0))
        for n in range(1, 13):
            monkeypatch.setattr(redis_calls, "_check", interrupted)
            with pytest.raises(_Interrupted):
                sm.update_state("u1", user(n=n))
            monkeypatch.setattr(redis_calls, "_check", check)
            sm.update_state("u1", user(n=n))  # keeps a connection again
        assert shared.set("app-key", 1)
        assert sm.get_state("u1")["data"]["n"] == 12
    shared.close()


def test_a_store_closed_during_a_call_keeps_no_connection(app: Flask, client: redis.Redis) -> None:
    """reset_instance() or init_app() again while a request writes: the write
    finishes and gives its connection to the pool, not to the closed store."""
    shared = redis.Redis(
        connection_pool=redis.ConnectionPool.from_url(
            app.config["STATEMANAGER_REDIS_URL"], max_connections=4
        )
    )
    with app.app_context():
        _shared_store(app, shared).register_state("u1", "user", user(n=0))
    for n in range(1, 7):
        store = app.extensions["statemanager"].store
        with app.app_context():
            StateManager().update_state("u1", user(n=n))  # keeps a connection
        client.client_pause(200, all=False)

        def write(n: int = n) -> None:
            with app.app_context():
                StateManager().update_state("u1", user(n=n))

        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(0.05)  # the write waits on the paused server
        store.close()  # what the app's teardown does; then a new store takes over
        app.extensions["statemanager"].store = RedisStore(shared, prefix="statemanager")
        writer.join()
    assert shared.set("app-key", 1)  # would be "Too many connections"
    with app.app_context():
        assert _history_versions(StateManager(), "u1") == list(range(1, 14))
    shared.close()


@pytest.mark.parametrize("client_side_cache", [False, True])
def test_scripts_run_on_a_resp3_client(
    app: Flask, monkeypatch: pytest.MonkeyPatch, client_side_cache: bool
) -> None:
    """RESP3 (redis-py 8's default), and with redis-py's client-side cache (whose
    connections go back to the pool after each call): writes, reads, searches
    and history agree."""
    options: dict[str, Any] = {"protocol": 3}
    if client_side_cache:
        # redis-py asks for Redis 7.4; the tracking it relies on is older (6.0).
        monkeypatch.setattr(redis.connection.CacheProxyConnection, "MIN_ALLOWED_VERSION", "7.0.0")
        options["cache_config"] = redis.cache.CacheConfig()
    shared = redis.Redis.from_url(app.config["STATEMANAGER_REDIS_URL"], **options)
    with app.app_context():
        sm = _shared_store(app, shared)
        sm.register_state("u1", "user", user(n=0, status="a"))
        for n in range(1, 6):
            assert sm.get_state("u1")["data"]["n"] == n - 1
            sm.update_state("u1", user(n=n, status="a"))
        assert sm.get_state("u1")["version"] == 6
        assert sm.search_states("user", {"data.status": "a"}).total == 1
        assert _history_versions(sm, "u1") == list(range(1, 7))
        assert list(sm.verify_history("u1")) == ["u1"]
    shared.close()


def test_a_push_message_between_calls_makes_the_next_call_reconnect(app: Flask) -> None:
    """A RESP3 push (here a tracking invalidation) that reaches a kept connection
    between calls is never taken for the next call's reply."""
    shared = redis.Redis.from_url(app.config["STATEMANAGER_REDIS_URL"], protocol=3)
    with app.app_context():
        sm = _shared_store(app, shared)
        sm.register_state("u1", "user", user(n=0))
        scripts = app.extensions["statemanager"].store._scripts
        assert scripts.execute("CLIENT", "TRACKING", "ON") == b"OK"
        scripts.execute("GET", "tracked")  # the kept connection now tracks the key
        shared.set("tracked", 1)  # the server pushes an invalidation to it
        sm.update_state("u1", user(n=1))
        assert scripts.execute("GET", "tracked") == b"1"
        assert sm.get_state("u1")["data"]["n"] == 1
        assert _history_versions(sm, "u1") == [1, 2]
    shared.close()


# -- a server that does not answer -------------------------------------------------------


@pytest.mark.parametrize("url", [UNREACHABLE, "redis://:s3cret-pw@127.0.0.1:9/0"])
def test_unreachable_server(tmp_path: Path, url: str) -> None:
    app = make_app(tmp_path, STATEMANAGER_STORE="redis", STATEMANAGER_REDIS_URL=url)
    manager = StateManager()
    manager.init_app(app)
    with app.app_context():
        failures = [
            manager.create_all,
            lambda: manager.register_state("u1", "user", user()),
            lambda: manager.get_state("u1"),
            lambda: manager.bulk_get(["u1"]),
            lambda: manager.search_states("user"),
            lambda: manager.get_state_history("u1"),
            lambda: manager.get_recent_changes(),
            manager.sweep_expired,
        ]
        for call in failures:
            with pytest.raises(BackendUnavailableError) as info:
                call()
            assert info.value.backend == "redis"
            message = str(info.value)
            assert "redis://" not in message and "s3cret" not in message
        health = manager.get_health_status()
    assert health["status"] == "unhealthy"
    assert health["checks"]["database"]["status"] == "down"
    assert "s3cret" not in str(health)


def test_responses_decoded_as_text(tmp_path: Path, clean_redis: str) -> None:
    """A client made with decode_responses=True (the application's own) works as well."""
    app, manager = _app_on(tmp_path, redis.Redis.from_url(clean_redis, decode_responses=True))
    with app.app_context():
        manager.create_all()
        manager.register_state("u1", "user", user(status="ok"), ttl=60)
        manager.transition("u1", "activate")
        assert manager.get_state("u1")["status"] == "active"
        assert manager.bulk_get(["u1"]).keys() == {"u1"}
        assert manager.search_states("user", {"data.status": "ok"}).total == 1
        assert [c["version"] for c in manager.get_recent_changes()] == [2, 1]
        assert manager.get_health_status()["state_count"] == 1


# -- search semantics, property-tested ------------------------------------------------------------


@pytest.fixture(scope="class")
def loaded(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[tuple[Flask, list[State]]]:
    StateManager.reset_instance()
    manager = StateManager()
    manager.register_type("doc", indexes=["data.a"])
    app = make_app(
        tmp_path_factory.mktemp("redis_props"),
        STATEMANAGER_STORE="redis",
        STATEMANAGER_REDIS_URL=redis_url,
        STATEMANAGER_KEY_PREFIX="statemanager_properties",
    )
    manager.init_app(app)
    records = []
    with app.app_context():
        manager.create_all()
        manager.store.reset()
        for i, data in enumerate(_documents()):
            meta = {"m": data.get("a")} if i % 2 else {}
            records.append(
                manager.register_state(
                    f"d{i}",
                    "doc",
                    {"name": "nm"[i % 2] + str(i % 7), "data": data, "metadata": meta},
                    ttl=[None, 3600, 7200][i % 3],
                )
            )
            if i % 4 == 0:
                records[-1] = manager.transition(f"d{i}", "activate")
    yield app, records
    with app.app_context():
        manager.store.reset()
    StateManager.reset_instance()


class TestSearchProperties:
    """Random filters, orders and pages on Redis agree with the reference semantics."""

    @pytest.fixture(autouse=True)
    def _no_leaks(self) -> Iterator[None]:
        # The class-scoped app below outlives single tests; keep the singleton.
        yield

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        query=filters(),
        order=st.sampled_from(sorted(COLUMNS)),
        descending=st.booleans(),
        per_page=st.integers(1, 30),
        page=st.integers(1, 4),
    )
    def test_search_matches_reference(
        self,
        loaded: tuple[Flask, list[State]],
        query: dict[str, Any],
        order: str,
        descending: bool,
        per_page: int,
        page: int,
    ) -> None:
        app, records = loaded
        conditions = parse_conditions(query)
        found = [r for r in records if all(matches(r, c) for c in conditions)]
        expected = _reference_order(found, order, descending)
        with app.app_context():
            manager = StateManager()
            everything = manager.search_states(
                "doc", query, per_page=500, order_by=("-" if descending else "") + order
            )
            one = manager.search_states(
                "doc",
                query,
                page=page,
                per_page=per_page,
                order_by=("-" if descending else "") + order,
            )
        assert [s["state_id"] for s in everything] == [s["state_id"] for s in expected]
        assert everything.total == one.total == len(expected)
        window = expected[(page - 1) * per_page : page * per_page]
        assert [s["state_id"] for s in one] == [s["state_id"] for s in window]
        assert list(everything) == expected  # whole records, as stored


def _redis_config(app: Flask) -> dict[str, Any]:
    """The config of a worker process on *app*'s Redis store."""
    return {
        "STATEMANAGER_STORE": "redis",
        "STATEMANAGER_REDIS_URL": app.config["STATEMANAGER_REDIS_URL"],
    }
