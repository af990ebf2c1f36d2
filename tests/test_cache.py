"""The Redis cache in front of the SQL store.

The whole store contract runs on PostgreSQL and SQLite behind the cache. Then
what only a cache has: hits served from Redis, the hit rate, racing fills and
write-throughs, invalidation on delete and expiry; faults on a real
``redis-server`` started here (killed, paused, restarted from its AOF with old
entries); and four processes incrementing one counter through the cache.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import sqlalchemy as sa
from cryptography.fernet import Fernet
from flask import Flask

from flask_statemanager import BackendUnavailableError, StateManager
from flask_statemanager.records import Change
from flask_statemanager.stores.base import Retention, Write
from flask_statemanager.stores.cache import CachedStore, _Budget, _Skipped

from . import workers
from .conftest import IN_CI, make_app
from .test_contract import StoreContract

T = TypeVar("T")

#: The cache's timeout in these tests (the default), and slack for the database's own work.
TIMEOUT = 0.1
SLACK = 0.05


def user(**data: Any) -> dict[str, Any]:
    return {"name": "user_account_state", "type": "user", "data": data}


def cached_store(manager: StateManager) -> CachedStore:
    store = manager.store
    assert isinstance(store, CachedStore)
    return store


# -- the store contract behind the cache ----------------------------------------------------


class TestPostgresCachedStore(StoreContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path, postgres_url: str, clean_redis: str) -> dict[str, Any]:
        return {"STATEMANAGER_DATABASE_URI": postgres_url, "STATEMANAGER_REDIS_URL": clean_redis}

    def test_the_cache_is_in_front(self, sm: StateManager) -> None:
        assert cached_store(sm).kind == "sql"
        assert sm.get_health_status()["checks"]["redis"]["status"] == "up"


class TestSQLiteCachedStore(StoreContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path, clean_redis: str) -> dict[str, Any]:
        return {"STATEMANAGER_REDIS_URL": clean_redis}

    def test_the_cache_is_in_front(self, sm: StateManager) -> None:
        assert cached_store(sm).kind == "sql"
        assert sm.get_health_status()["checks"]["redis"]["status"] == "up"


# -- cache behaviour ----------------------------------------------------------------------


def _app(tmp_path: Path, redis_url: str, **config: Any) -> Flask:
    app = make_app(tmp_path, STATEMANAGER_REDIS_URL=redis_url, **config)
    StateManager().init_app(app)
    with app.app_context():
        StateManager().create_all()
        StateManager().store.reset()
    return app


@pytest.fixture
def sm(tmp_path: Path, clean_redis: str) -> Iterator[StateManager]:
    """A manager on SQLite with the cache on the test Redis."""
    with _app(tmp_path, clean_redis).app_context():
        yield StateManager()


def _change_behind_the_cache(store: CachedStore, state_id: str, data: dict[str, Any]) -> None:
    inner: Any = store.inner
    with inner.engine.begin() as conn:
        conn.execute(
            sa.update(inner.states).where(inner.states.c.state_id == state_id).values(data=data)
        )


def test_hits_are_served_from_redis_until_a_write_goes_through(sm: StateManager) -> None:
    store = cached_store(sm)
    sm.register_state("u1", "user", user(n=1))
    assert sm.get_state("u1")["data"] == {"n": 1}  # a miss: read from SQL and filled
    _change_behind_the_cache(store, "u1", {"n": 99})
    assert store.inner.get("u1")["data"] == {"n": 99}
    assert sm.get_state("u1")["data"] == {"n": 1}  # served from Redis
    assert sm.bulk_get(["u1"])["u1"]["data"] == {"n": 1}
    updated = sm.update_state("u1", user(n=2))
    assert updated["version"] == 2
    assert store.peek("u1") == updated  # written through after the commit
    assert sm.get_state("u1") == updated
    assert store.cache_stats()["write_throughs"] == 1


def test_hit_rate_in_health_and_stats(sm: StateManager) -> None:
    store = cached_store(sm)
    assert sm.get_health_status()["cache_hit_rate"] is None
    sm.register_state("u1", "user", user())
    sm.get_state("u1")  # miss
    assert sm.get_health_status()["cache_hit_rate"] == 0.0
    sm.get_state("u1")  # hit
    sm.get_state("nobody")  # miss; cached as absent
    sm.get_state("nobody")  # hit
    assert sm.get_health_status()["cache_hit_rate"] == 0.5
    assert sm.bulk_get(["u1", "nobody", "u2"]) == {"u1": sm.get_state("u1")}  # 2 hits, 1 miss
    stats = store.cache_stats()
    assert (stats["hits"], stats["misses"]) == (5, 3)
    assert store.cache_hit_rate == stats["hit_rate"] == 5 / 8
    health = sm.get_health_status()
    assert health["status"] == "healthy"
    assert health["cache_hit_rate"] == 5 / 8
    assert sm.get_metrics()["cache"]["hits"] == 5
    redis_check = health["checks"]["redis"]
    assert redis_check["component"] == "redis" and redis_check["status"] == "up"
    assert redis_check["latency_ms"] >= 0 and redis_check["time"].endswith("Z")


def test_bulk_get_is_one_round_trip_when_everything_is_cached(
    sm: StateManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = cached_store(sm)
    ids = [f"u{i}" for i in range(20)]
    for state_id in ids:
        sm.register_state(state_id, "user", user(id=state_id))
    assert len(sm.bulk_get(ids)) == 20  # misses: one read, one SQL query, one fill
    commands = _sent_commands(store, monkeypatch)
    states = sm.bulk_get(ids)
    assert [s["data"]["id"] for s in states.values()] == ids
    assert commands == ["MGET"]


def test_a_hit_is_one_mget_and_nothing_else(
    sm: StateManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = cached_store(sm)
    sm.register_state("u1", "user", user(n=1))
    assert sm.get_state("u1")["version"] == 1  # the miss fills
    assert sm.get_state("u1")["version"] == 1  # connections are open and checked
    sent = _sent_commands(store, monkeypatch)  # scripts, checks and retries too
    hits = store.cache_stats()["hits"]
    assert sm.get_state("u1")["data"] == {"n": 1}
    assert sent == ["MGET"]
    assert store.cache_stats()["hits"] == hits + 1


def test_every_new_connection_bumps_when_the_server_changed(sm: StateManager) -> None:
    """What a restart looks like to the cache: another run_id, connections dropped."""
    store = cached_store(sm)
    sm.register_state("u1", "user", user(n=1))
    assert sm.get_state("u1")["version"] == 1
    assert store.peek("u1")["version"] == 1
    generation_key = f"{store.prefix}:cache:generation"
    generation = int(store.client.get(generation_key))
    # Same server, same run: a new connection leaves the generation alone.
    store.client.connection_pool.disconnect()
    assert sm.get_state("u1")["version"] == 1  # a command's connection reconnects
    assert store.peek("u1")["version"] == 1  # and so does a script's (it keeps its own)
    assert int(store.client.get(generation_key)) == generation
    # Another run (as after a restart from an AOF): the next connection bumps first.
    store.client.set(f"{store.prefix}:cache:run", "0" * 40)
    assert store.peek("u1")["version"] == 1  # an open connection was checked before
    store.client.connection_pool.disconnect()
    assert int(store.client.get(generation_key)) > generation
    hits = store.cache_stats()["hits"]
    assert sm.get_state("u1")["version"] == 1  # a miss: the old entry no longer counts
    assert store.cache_stats()["hits"] == hits
    assert store.cache_stats()["errors"] == 0


def test_a_generation_hash_of_an_older_version_is_replaced(sm: StateManager) -> None:
    store = cached_store(sm)
    generation_key = f"{store.prefix}:cache:generation"
    store.client.delete(generation_key)
    store.client.hset(generation_key, mapping={"n": "99999999999999", "run": "x"})
    store.client.connection_pool.disconnect()
    sm.register_state("u1", "user", user(n=1))
    assert sm.get_state("u1")["version"] == 1
    assert int(store.client.get(generation_key)) > 99999999999999
    assert store.cache_stats()["errors"] == 0


def test_a_slow_filler_never_replaces_a_newer_version(sm: StateManager) -> None:
    store = cached_store(sm)
    sm.register_state("u1", "user", user(n=1))
    # A reader misses and reads version 1 from SQL, then stalls ...
    hits, leases = store._lookup(["u1"])
    assert hits == {} and set(leases) == {"u1"}
    old = store.inner.get("u1")
    # ... while a writer commits version 2: its write-through revokes the lease.
    sm.update_state("u1", user(n=2))
    assert store._fill(leases, {"u1": old}) == 0
    assert store.peek("u1") is None
    assert sm.get_state("u1")["version"] == 2  # a fresh miss fills version 2
    assert store.peek("u1")["version"] == 2
    # A filler holding a lease but an older version than the entry changes nothing.
    assert store._fill(leases, {"u1": old}) == 0
    # Neither does a late write-through of version 1 (writers finishing out of order).
    assert old is not None
    stale = Write(old, 0, Change(state_id="u1", version=1))
    store._write_through([stale], store._generation)
    assert store.peek("u1")["version"] == 2
    assert sm.get_state("u1")["data"] == {"n": 2}


def test_of_two_fills_sharing_a_lease_the_higher_version_stays(sm: StateManager) -> None:
    store = cached_store(sm)
    sm.register_state("u1", "user", user(n=1))
    sm.update_state("u1", user(n=2))
    _, first = store._lookup(["u1"])
    _, second = store._lookup(["u1"])
    assert first == second  # a second reader shares the lease
    v1 = sm.get_state_history("u1")[0]
    newer = store.inner.get("u1")
    assert newer is not None and newer["version"] == 2
    older = type(newer)(newer, version=1, etag="1", data=v1["new_data"])
    assert store._fill(second, {"u1": newer}) == 1
    assert store._fill(first, {"u1": older}) == 0
    assert store.peek("u1") == newer


def test_delete_and_expiry_leave_versioned_tombstones(sm: StateManager) -> None:
    store = cached_store(sm)
    sm.register_state("u1", "user", user(n=1))
    sm.get_state("u1")
    sm.delete_state("u1")
    tombstone = store.peek("u1")
    assert tombstone is not None
    assert (tombstone["status"], tombstone["version"]) == ("deleted", 2)
    assert sm.get_state("u1") is None
    assert sm.bulk_get(["u1"]) == {}
    again = sm.register_state("u1", "user", user(n=3))
    assert store.peek("u1") == again and again["version"] == 3

    sm.register_state("s1", "session", {"data": {}}, ttl=0.2)
    assert sm.get_state("s1") is not None  # cached while live
    time.sleep(0.3)
    assert sm.get_state("s1") is None  # the read records the expiry ...
    expired = store.peek("s1")
    assert expired is not None  # ... and writes it through
    assert (expired["status"], expired["version"]) == ("expired", 2)
    assert sm.get_state("s1", include_expired=True)["version"] == 2


def test_entries_expire_after_the_cache_ttl(tmp_path: Path, clean_redis: str) -> None:
    with _app(tmp_path, clean_redis, STATEMANAGER_CACHE_TTL=0.3).app_context():
        sm = StateManager()
        store = cached_store(sm)
        sm.register_state("u1", "user", user())
        sm.get_state("u1")
        assert 0 < store.client.pttl(store.key("u1")) <= 300
        sm.update_state("u1", user(n=2))
        assert 0 < store.client.pttl(store.key("u1")) <= 300
        time.sleep(0.4)
        assert store.client.exists(store.key("u1")) == 0
        assert store.peek("u1") is None


def test_a_write_with_an_unknown_outcome_drops_the_entry(
    sm: StateManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = cached_store(sm)
    sm.register_state("u1", "user", user(n=1))
    sm.get_state("u1")
    apply = store.inner.apply

    def commit_then_fail(*args: Any) -> Any:
        apply(*args)  # the commit happened, but the caller cannot know
        raise BackendUnavailableError("connection lost after COMMIT", backend="sql")

    monkeypatch.setattr(store.inner, "apply", commit_then_fail)
    with pytest.raises(BackendUnavailableError):
        sm.update_state("u1", user(n=2))
    monkeypatch.undo()
    assert store.client.exists(store.key("u1")) == 0
    assert sm.get_state("u1")["version"] == 2


def test_reset_drops_every_cache_key(sm: StateManager) -> None:
    store = cached_store(sm)
    for i in range(5):
        sm.register_state(f"u{i}", "user", user())
        sm.get_state(f"u{i}")
    generation = store.client.get(f"{store.prefix}:cache:generation")
    store.reset()
    assert list(store.client.scan_iter(match=f"{store.prefix}:cache:{{*")) == []
    assert int(store.client.get(f"{store.prefix}:cache:generation")) > int(generation)
    assert sm.get_state("u1") is None


# -- operations that lower a version, and fills or write-throughs that arrive late ----------


def test_a_late_fill_never_undoes_a_restore_that_lowered_the_version(sm: StateManager) -> None:
    store = cached_store(sm)
    sm.register_state("u1", "user", user(n=1))
    backup = store.inner.get("u1"), store.inner.history("u1")
    for n in (2, 3, 4):
        sm.update_state("u1", user(n=n))
    assert backup[0] is not None
    # A slow reader takes a lease and reads version 4, then stalls ...
    _, leases = store._lookup(["u1"])
    old = store.inner.get("u1")
    # ... while `flask states import --replace` puts version 1 back, and a read fills it.
    store.restore(backup[0], backup[1], replace=True)
    assert sm.get_state("u1")["data"] == {"n": 1}
    assert store._fill(leases, {"u1": old}) == 0
    assert store.peek("u1")["data"] == {"n": 1}
    assert sm.get_state("u1")["data"] == {"n": 1}
    assert sm.update_state("u1", user(n=5))["version"] == 2
    assert sm.get_state("u1")["data"] == {"n": 5}


def test_a_late_fill_never_brings_back_a_purged_tombstone(sm: StateManager) -> None:
    store = cached_store(sm)
    sm.register_state("u1", "user", user(n=1))
    sm.delete_state("u1")  # the tombstone, version 2
    _, leases = store._lookup(["u1"])
    tombstone = store.inner.get("u1")
    assert tombstone is not None and tombstone["status"] == "deleted"
    soon = datetime.now(UTC) + timedelta(seconds=5)
    purged = [b.purged for b in store.prune("user", Retention(purge_before=soon))]
    assert [list(ids) for ids in purged] == [["u1"]]
    again = sm.register_state("u1", "user", user(n=100))
    assert again["version"] == 1
    assert sm.get_state("u1") == again  # filled
    assert store._fill(leases, {"u1": tombstone}) == 0
    assert sm.get_state("u1") == again
    assert sm.bulk_get(["u1"]) == {"u1": again}
    assert store.peek("u1") == again


def test_a_fill_from_before_a_reset_never_lands(sm: StateManager) -> None:
    store = cached_store(sm)
    sm.register_state("u1", "user", user(n=1))
    sm.update_state("u1", user(n=2))
    sm.update_state("u1", user(n=3))
    _, leases = store._lookup(["u1"])
    old = store.inner.get("u1")
    store.reset()
    fresh = sm.register_state("u1", "user", user(n=100))
    assert sm.get_state("u1") == fresh  # filled under the new generation
    assert store._fill(leases, {"u1": old}) == 0
    assert sm.get_state("u1") == fresh
    assert store.peek("u1") == fresh


def test_a_late_write_through_never_undoes_a_restore(
    sm: StateManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = cached_store(sm)
    sm.register_state("u1", "user", user(n=1))
    assert sm.get_state("u1")["version"] == 1
    backup = store.inner.get("u1"), store.inner.history("u1")
    assert backup[0] is not None
    held: list[tuple[Any, ...]] = []
    write_through = store._write_through
    # The writer commits version 2; its write-through is slow to arrive.
    monkeypatch.setattr(store, "_write_through", lambda *args: held.append(args))
    assert sm.update_state("u1", user(n=2))["version"] == 2
    monkeypatch.undo()
    store.restore(backup[0], backup[1], replace=True)  # import --replace: version 1 again
    assert sm.get_state("u1")["data"] == {"n": 1}  # filled
    write_through(*held[0])  # ... and now the write-through of version 2 arrives
    assert store.client.exists(store.key("u1")) == 0  # deleted, not written
    assert sm.get_state("u1")["data"] == {"n": 1}
    assert store.peek("u1")["data"] == {"n": 1}
    # Under a generation it knew before committing, a writer still writes through.
    assert sm.update_state("u1", user(n=3))["version"] == 2
    assert store.peek("u1")["data"] == {"n": 3}
    assert store.cache_stats()["write_throughs"] >= 1


def test_a_write_skipped_during_the_probe_is_made_up(tmp_path: Path, clean_redis: str) -> None:
    """A's probe has bumped and its reply is on the way; A's write-through meanwhile is skipped."""
    config = {"STATEMANAGER_DATABASE_URI": f"sqlite:///{tmp_path / 'shared.sqlite3'}"}
    app_a = _app(tmp_path / "a", clean_redis, **config)
    app_b = _app(tmp_path / "b", clean_redis, **config)
    manager = StateManager()
    with app_a.app_context():
        manager.register_state("u1", "user", user(n=1))
        a = cached_store(manager)
    with app_b.app_context():
        b = cached_store(manager)
    a._circuit.failed("ConnectionError: a blip")  # A saw Redis fail; the cooldown is over
    a._circuit._open_until = 0.0
    bumped, release = threading.Event(), threading.Event()

    def probe(bump: bool) -> Any:
        generation = a._scripts.run("probe", [a._generation_key], ["1" if bump else "0"])
        bumped.set()
        assert release.wait(10)
        return generation

    prober = threading.Thread(target=lambda: a._call("health check", probe))
    prober.start()
    try:
        assert bumped.wait(10)
        with app_b.app_context():
            assert manager.get_state("u1")["version"] == 1  # B fills version 1, new generation
        with app_a.app_context():
            assert manager.update_state("u1", user(n=2))["version"] == 2  # write-through skipped
    finally:
        release.set()
        prober.join()
    assert a.cache_stats()["circuit"] != "closed"  # the probe could not close it
    with app_a.app_context():
        assert manager.get_state("u1")["data"] == {"n": 2}  # A bumps again first
        assert manager.get_health_status()["checks"]["redis"]["status"] == "up"
    assert a.cache_stats()["circuit"] == "closed"
    with app_b.app_context():
        assert manager.get_state("u1")["data"] == {"n": 2}
        assert b.peek("u1")["version"] == 2


class _Interrupt(BaseException):
    """What gevent.Timeout or a worker's SystemExit looks like to the cache."""


def test_an_interrupted_write_through_opens_the_circuit(
    tmp_path: Path, clean_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _app(tmp_path, clean_redis, STATEMANAGER_CACHE_COOLDOWN=0.2).app_context():
        sm = StateManager()
        store = cached_store(sm)
        sm.register_state("u1", "user", user(n=1))
        assert sm.get_state("u1")["version"] == 1

        run = store._scripts.run

        def interrupted(name: str, keys: Any, args: Any) -> Any:
            if name == "write":
                raise _Interrupt
            return run(name, keys, args)

        monkeypatch.setattr(store._scripts, "run", interrupted)
        with pytest.raises(_Interrupt):
            sm.update_state("u1", user(n=2))  # committed; the write-through never ran
        monkeypatch.undo()
        stats = store.cache_stats()
        assert (stats["circuit"], stats["errors"]) == ("open", 1)
        assert sm.get_state("u1")["data"] == {"n": 2}  # from the database
        time.sleep(0.25)
        assert sm.get_state("u1")["data"] == {"n": 2}  # the probe bumped first
        assert store.cache_stats()["circuit"] == "closed"
        assert store.peek("u1")["data"] == {"n": 2}


def test_rotate_keys_leaves_no_plaintext_in_redis(tmp_path: Path, clean_redis: str) -> None:
    key = Fernet.generate_key()
    app = _app(tmp_path, clean_redis, STATEMANAGER_ENCRYPTION_KEYS=[key])
    manager = StateManager()
    manager.register_type("cachecard")
    with app.app_context():
        store = cached_store(manager)
        for i in range(3):
            manager.register_state(f"c{i}", "cachecard", {"data": {"pan": f"411111111111{i}"}})
            assert manager.get_state(f"c{i}")["data"]["pan"] == f"411111111111{i}"  # cached
    raw = redis.Redis.from_url(clean_redis)

    def plaintext_in_redis() -> list[bytes]:
        keys = list(raw.scan_iter(match=f"{store.prefix}:cache:{{*"))
        return [k for k in keys if b"41111111111" in (raw.get(k) or b"")]

    assert len(plaintext_in_redis()) == 3
    manager.register_type("cachecard", encrypted_fields=["data.pan"])  # now a secret
    manager.init_app(app)
    with app.app_context():
        store = cached_store(manager)
        result = app.test_cli_runner().invoke(args=["states", "rotate-keys", "--batch-size", "2"])
        assert result.exit_code == 0, result.output
        assert plaintext_in_redis() == []
        assert manager.get_state("c1")["data"]["pan"] == "4111111111111"  # filled again
        assert store.peek("c1")["data"]["pan"].startswith("fernet:")  # Redis holds ciphertext
        assert plaintext_in_redis() == []
    raw.close()


def _sent_commands(store: CachedStore, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every command this store's connections send from now on (scripts, checks, retries)."""
    sent: list[Any] = []
    connection_class = store.client.connection_pool.connection_class
    send = connection_class.send_packed_command

    def counting(self: Any, command: Any, *args: Any, **options: Any) -> Any:
        # RESP: *<n> $<len> NAME $<len> FIRST-ARGUMENT ...
        words = b"".join(bytes(c) for c in command).split(b"\r\n")
        name = words[2].decode()
        sent.append(name if name != "CLIENT" else f"CLIENT {words[4].decode()}")
        return send(self, command, *args, **options)

    monkeypatch.setattr(connection_class, "send_packed_command", counting)
    return sent


def test_a_miss_reads_the_entry_once_and_connecting_sends_no_client_setinfo(
    sm: StateManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = cached_store(sm)
    sm.register_state("u1", "user", user(n=1))
    sm.register_state("u2", "user", user(n=2))
    assert sm.get_state("u1")["version"] == 1  # connections are open and checked
    sent = _sent_commands(store, monkeypatch)
    assert sm.get_state("u2")["data"] == {"n": 2}
    assert sent == ["MGET", "EVALSHA", "EVALSHA"]  # the hit path, the lease, the fill
    assert store.peek("u2")["data"] == {"n": 2}
    sent.clear()
    store.client.connection_pool.disconnect()
    assert sm.get_state("u2")["data"] == {"n": 2}  # a hit on a new connection
    assert not [c for c in sent if str(c).startswith("CLIENT")], sent
    assert sent[-2:] == ["EVAL", "MGET"]  # the restart check, then the hit


def test_a_read_whose_redis_time_is_up_leaves_redis_alone(sm: StateManager) -> None:
    store = cached_store(sm)
    sm.register_state("u1", "user", user(n=1))
    spent = _Budget(TIMEOUT)
    spent.left = TIMEOUT / 8  # less than one socket wait left
    with pytest.raises(_Skipped):
        store._lookup(["u1"], spent)
    assert store.client.exists(store.key("u1")) == 0  # no lease taken
    _, leases = store._lookup(["u1"], _Budget(TIMEOUT))
    assert store._fill(leases, {"u1": store.inner.get("u1")}, spent) == 0
    assert store.client.get(store.key("u1")) == leases["u1"]  # the lease just runs out
    assert store.cache_stats()["skipped"] == 2
    assert store.cache_stats()["circuit"] == "closed"  # time up is no failure
    assert sm.get_state("u1")["version"] == 1


def test_own_client_with_short_timeouts_and_one_retry(tmp_path: Path, clean_redis: str) -> None:
    app_client = redis.Redis.from_url(clean_redis)
    manager = StateManager.get_instance(redis_manager=app_client)
    app = make_app(tmp_path, STATEMANAGER_CACHE_TIMEOUT=0.2)
    manager.init_app(app)
    with app.app_context():
        store = cached_store(manager)
        kwargs = store.client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.05
        assert kwargs["retry"].get_retries() == 1
        assert store.client is not app_client
        assert app_client.connection_pool.connection_kwargs.get("socket_timeout") != 0.05
        manager.register_state("u1", "user", user())
        assert manager.get_state("u1")["version"] == 1
    app_client.close()


def test_health_never_shows_the_password_or_address(tmp_path: Path, redis_url: str) -> None:
    # The test server knows no such user: AUTH fails, and the cache is down.
    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    wrong = f"redis://nobody:hunter2secret@127.0.0.1:{port}/0"
    with _app(tmp_path, wrong).app_context():
        sm = StateManager()
        sm.register_state("u1", "user", user())
        assert sm.get_state("u1")["version"] == 1
        health = sm.get_health_status()
    assert health["status"] == "degraded"
    assert health["checks"]["redis"]["status"] == "down"
    assert health["checks"]["redis"]["error"]
    text = json.dumps(health)
    assert "hunter2secret" not in text and str(port) not in text and "redis://" not in text


def test_a_failed_write_through_is_invalidated_by_the_writers_bump(
    tmp_path: Path, clean_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one gap left (documented): a writer that cannot reach Redis while others can.

    Writer A's write-through fails while Redis stays up for B (a partial
    partition). B may read the older entry until A's process bumps the
    generation, which it does before it uses Redis again; from then on nobody
    gets the older version.
    """
    config = {
        "STATEMANAGER_DATABASE_URI": f"sqlite:///{tmp_path / 'shared.sqlite3'}",
        "STATEMANAGER_CACHE_COOLDOWN": 0.3,
    }
    app_a = _app(tmp_path / "a", clean_redis, **config)
    app_b = _app(tmp_path / "b", clean_redis, **config)
    manager = StateManager()
    with app_a.app_context():
        manager.register_state("u1", "user", user(n=1))
        assert manager.get_state("u1")["version"] == 1
        a = cached_store(manager)
    with app_b.app_context():
        b = cached_store(manager)
        assert manager.get_state("u1")["version"] == 1  # a hit for B too

    run = a._scripts.run

    def unreachable(name: str, keys: Any, args: Any) -> Any:
        if name == "write":
            raise redis.ConnectionError("Error 113 connecting to 10.0.0.9:6379. No route to host.")
        return run(name, keys, args)

    monkeypatch.setattr(a._scripts, "run", unreachable)
    with app_a.app_context():
        assert manager.update_state("u1", user(n=2))["version"] == 2
        assert a.cache_stats()["errors"] == 1
        assert manager.get_state("u1")["version"] == 2  # A skips Redis: the circuit is open
        assert manager.get_health_status()["status"] == "degraded"
    with app_b.app_context():
        assert b.peek("u1")["version"] == 1  # the gap: B still reaches the older entry
    monkeypatch.undo()
    time.sleep(0.35)
    with app_a.app_context():
        assert manager.get_state("u1")["version"] == 2  # the half-open probe bumps first
        assert manager.get_health_status()["status"] == "healthy"
    with app_b.app_context():
        assert b.peek("u1")["version"] == 2  # filled by A's read under the new generation
        assert manager.get_state("u1")["data"] == {"n": 2}


# -- faults on a real redis-server ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A ``redis-server`` of our own, with an append-only file fsynced on every write."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server is not on PATH; the fault tests start their own server."
            if IN_CI:
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        self.binary = binary
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise AssertionError(f"redis-server did not start on {self.port}") from None
                time.sleep(0.02)
            finally:
                client.close()

    def kill(self) -> None:
        assert self.process is not None
        if self.paused:
            self.resume()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self.paused = False


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    yield server
    if server.process is not None:
        server.kill()


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _fault_app(tmp_path: Path, server: RedisServer, **config: Any) -> Flask:
    return _app(
        tmp_path,
        server.url,
        STATEMANAGER_CACHE_TIMEOUT=TIMEOUT,
        STATEMANAGER_SQLITE_SYNCHRONOUS="NORMAL",
        **config,
    )


def _work_without_redis(sm: StateManager, rounds: int) -> list[float]:
    """Reads and writes while Redis is gone: every answer right, every call's duration."""
    durations: list[float] = []
    for n in range(rounds):
        state, spent = _timed(lambda: sm.get_state("u1"))
        durations.append(spent)
        version = state["version"]
        updated, spent = _timed(lambda: sm.update_state("u1", user(n=n)))  # noqa: B023
        durations.append(spent)
        assert updated["version"] == version + 1
        many, spent = _timed(lambda: sm.bulk_get(["u1", "u2"]))
        durations.append(spent)
        assert many["u1"] == updated and many["u2"]["version"] == 1
        registered, spent = _timed(lambda: sm.register_state(f"new{n}", "user", user()))  # noqa: B023
        durations.append(spent)
        assert registered["version"] == 1
        health, spent = _timed(sm.get_health_status)
        durations.append(spent)
        assert health["status"] == "degraded"
        assert health["checks"]["redis"]["status"] == "down"
        assert health["checks"]["database"]["status"] == "up"
    return durations


@pytest.mark.slow
def test_killed_redis_reads_and_writes_go_on_against_the_database(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    with _fault_app(tmp_path, redis_server, STATEMANAGER_CACHE_COOLDOWN=60).app_context():
        sm = StateManager()
        store = cached_store(sm)
        sm.register_state("u1", "user", user(n=0))
        sm.register_state("u2", "user", user())
        assert sm.bulk_get(["u1", "u2"])["u1"]["version"] == 1
        assert store.peek("u1") is not None
        redis_server.kill()
        durations = _work_without_redis(sm, rounds=10)
        # Only the first call after the kill tried Redis; the circuit kept the
        # other 49 (and their write-throughs, and the health checks) away from it.
        stats = store.cache_stats()
        assert stats["errors"] == 1
        assert stats["circuit"] == "open"
        assert stats["skipped"] >= 49
        assert max(durations) <= TIMEOUT + SLACK, durations
        assert sm.get_state("u1")["version"] == 11
        assert [c["version"] for c in sm.get_state_history("u1")] == list(range(1, 12))


@pytest.mark.slow
def test_paused_redis_never_makes_a_call_hang(tmp_path: Path, redis_server: RedisServer) -> None:
    cooldown = 1.0
    with _fault_app(tmp_path, redis_server, STATEMANAGER_CACHE_COOLDOWN=cooldown).app_context():
        sm = StateManager()
        store = cached_store(sm)
        sm.register_state("u1", "user", user(n=0))
        sm.register_state("u2", "user", user())
        assert sm.bulk_get(["u1", "u2"])["u1"]["version"] == 1
        redis_server.pause()
        try:
            started = time.monotonic()
            durations = _work_without_redis(sm, rounds=5)
            # The first call waited for the timeout (with its retry); the rest did not.
            assert max(durations) <= TIMEOUT + SLACK, durations
            assert durations[0] >= TIMEOUT / 4
            if time.monotonic() - started < cooldown:
                assert store.cache_stats()["errors"] == 1
        finally:
            redis_server.resume()
        time.sleep(cooldown)
        health = sm.get_health_status()  # the half-open probe: bump, and the cache is back
        assert health["status"] == "healthy", health
        assert store.cache_stats()["circuit"] == "closed"
        assert sm.get_state("u1")["version"] == 6
        assert sm.get_state("u1")["data"] == {"n": 4}
        assert store.peek("u1")["version"] == 6


@pytest.mark.slow
def test_redis_restarted_from_an_aof_with_old_entries_never_serves_them(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    cooldown = 0.5
    config = {
        "STATEMANAGER_DATABASE_URI": f"sqlite:///{tmp_path / 'shared.sqlite3'}",
        "STATEMANAGER_CACHE_COOLDOWN": cooldown,
    }
    # A writes during the outage; B stands for a process that never notices it.
    app_a = _fault_app(tmp_path / "a", redis_server, **config)
    app_b = _fault_app(tmp_path / "b", redis_server, **config)
    manager = StateManager()
    with app_a.app_context():
        manager.register_state("u1", "user", user(n=1))
        assert manager.get_state("u1")["version"] == 1
        a = cached_store(manager)
        key = a.key("u1")
        assert a.peek("u1")["version"] == 1
    with app_b.app_context():
        b = cached_store(manager)
        assert manager.get_state("u1")["version"] == 1  # a hit: B holds a connection
        assert b.cache_stats()["hits"] == 1

    raw = redis_server.client()
    old_entry = raw.get(key)
    old_generation = raw.mget(f"{a.prefix}:cache:generation", f"{a.prefix}:cache:run")
    raw.close()
    redis_server.kill()

    statuses = []
    with app_a.app_context():
        assert manager.update_state("u1", user(n=2))["version"] == 2  # no write-through
        assert manager.get_state("u1")["version"] == 2
        statuses.append(manager.get_health_status()["status"])

    redis_server.start()
    raw = redis_server.client()
    assert raw.get(key) == old_entry  # the AOF brought back version 1 ...
    assert raw.mget(f"{a.prefix}:cache:generation", f"{a.prefix}:cache:run") == old_generation
    raw.close()

    # B never saw a failure; its connection is gone, and the new one bumps first.
    with app_b.app_context():
        state = manager.get_state("u1")
        assert (state["version"], state["data"]) == (2, {"n": 2})
        assert b.cache_stats()["errors"] == 0
        assert b.peek("u1")["version"] == 2
    # A reads all along: from SQL while its circuit is open, then from Redis.
    deadline = time.monotonic() + cooldown + 0.5
    with app_a.app_context():
        while time.monotonic() < deadline:
            assert manager.get_state("u1")["version"] == 2
            assert manager.bulk_get(["u1"])["u1"]["version"] == 2
            statuses.append(manager.get_health_status()["status"])
            time.sleep(0.05)
        assert a.cache_stats()["circuit"] == "closed"
        assert a.peek("u1")["version"] == 2
    assert statuses[0] == "degraded" and statuses[-1] == "healthy"
    assert set(statuses) == {"degraded", "healthy"}


# -- processes ------------------------------------------------------------------------------


@pytest.mark.slow
def test_four_processes_fifty_increments_through_the_cache(
    tmp_path: Path, postgres_url: str, clean_redis: str
) -> None:
    app = _app(tmp_path, clean_redis, STATEMANAGER_DATABASE_URI=postgres_url)
    with app.app_context():
        manager = StateManager()
        manager.register_state("counter", "user", {"data": {"count": 0}})
        assert manager.get_state("counter")["version"] == 1  # cached before the race
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(4) as pool:
        failures = pool.starmap(
            workers.increment,
            [
                (
                    {
                        "STATEMANAGER_DATABASE_URI": postgres_url,
                        "STATEMANAGER_REDIS_URL": clean_redis,
                    },
                    str(tmp_path / "instance"),
                    "counter",
                    50,
                    True,
                )
            ]
            * 4,
        )
    assert failures == [0, 0, 0, 0]
    with app.app_context():
        store = cached_store(manager)
        cached = store.peek("counter")  # what the write-throughs left, before any fill
        assert cached is not None
        assert (cached["version"], cached["data"]) == (201, {"count": 200})
        state = manager.get_state("counter")
        history = manager.get_state_history("counter")
        assert list(manager.verify_history("counter")) == ["counter"]
    assert state == cached
    assert [c["version"] for c in history] == list(range(1, 202))
    assert all(c["new_data"]["count"] == c["old_data"]["count"] + 1 for c in history[1:])
