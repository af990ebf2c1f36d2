"""Retention (``prune``: history trimming, purging deleted states) and ``max_states``.

One contract class, run on the memory, SQLite, PostgreSQL, PostgreSQL behind
the Redis cache, and Redis stores; then what only the Redis store and the
cache can get wrong (pruned counts in the version, stale cache entries).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from flask_statemanager import (
    ConfigurationError,
    StateConflictError,
    StateExistsError,
    StateLimitError,
    StateManager,
    StateValidationError,
)
from flask_statemanager.audit import seal
from flask_statemanager.records import Change, State
from flask_statemanager.stores.base import Pruned, Write
from flask_statemanager.stores.cache import CachedStore
from flask_statemanager.stores.redis import RedisStore

from .conftest import make_app

MakeApp = Callable[..., Flask]


def doc(**data: Any) -> dict[str, Any]:
    return {"data": data}


def versions(sm: StateManager, state_id: str) -> list[int]:
    return [c["version"] for c in sm.get_state_history(state_id)]


def grow(sm: StateManager, state_id: str, type_name: str, updates: int) -> State:
    """Register *state_id* and update it *updates* times."""
    state = sm.register_state(state_id, type_name, doc(n=0))
    for n in range(1, updates + 1):
        state = sm.update_state(state_id, doc(n=n))
    return state


class RetentionContract:
    """Retention and limits on one store; subclasses provide ``store_config``."""

    @pytest.fixture
    def store_config(self, tmp_path: Path) -> dict[str, Any]:
        raise AssertionError("subclasses choose a store")

    @pytest.fixture
    def make(self, tmp_path: Path, store_config: dict[str, Any]) -> MakeApp:
        """Build the app, with extra config, after the test registered its types."""

        def build(**config: Any) -> Flask:
            app = make_app(tmp_path, **store_config, **config)
            manager = StateManager()
            manager.init_app(app)
            with app.app_context():
                manager.create_all()
                manager.store.reset()
            return app

        return build

    @pytest.fixture
    def sm(self, make: MakeApp) -> Iterator[StateManager]:
        manager = StateManager()
        manager.register_type("note", keep_history=3)
        manager.register_type("log", keep_history_for=0.3)
        manager.register_type("both", keep_history=3, keep_history_for=0.3)
        manager.register_type("temp", purge_deleted_after=0.3)
        manager.register_type("slot", max_states=2)
        with make().app_context():
            yield manager

    # -- history ------------------------------------------------------------------

    def test_keep_history_keeps_the_newest_entries(self, sm: StateManager) -> None:
        grow(sm, "n1", "note", 5)
        grow(sm, "n2", "note", 1)
        grow(sm, "u1", "user", 5)  # no retention: untouched
        report = sm.prune()
        assert (report.entries, report.purged) == (3, 0)
        assert report.types == {"note": (3, 0)}
        assert versions(sm, "n1") == [4, 5, 6]
        assert versions(sm, "n2") == [1, 2]
        assert versions(sm, "u1") == [1, 2, 3, 4, 5, 6]
        # The state is untouched and goes on from its version.
        assert sm.get_state("n1")["version"] == 6
        assert sm.update_state("n1", doc(n=6))["version"] == 7
        assert versions(sm, "n1") == [4, 5, 6, 7]
        assert [c["version"] for c in sm.get_recent_changes("n1", limit=10)] == [7, 6, 5, 4]
        # A second run has nothing left to do but the new entry.
        assert sm.prune().entries == 1
        assert versions(sm, "n1") == [5, 6, 7]
        # The hash chain verifies from the oldest entry left, which anchors it.
        assert sorted(sm.verify_history()) == ["n1", "n2", "u1"]

    def test_keep_history_for_keeps_recent_entries(self, sm: StateManager) -> None:
        grow(sm, "l1", "log", 2)
        time.sleep(0.35)
        sm.update_state("l1", doc(n=3))
        sm.update_state("l1", doc(n=4))
        assert sm.prune(dry_run=True).entries == 3
        assert versions(sm, "l1") == [1, 2, 3, 4, 5]
        assert sm.prune().entries == 3
        assert versions(sm, "l1") == [4, 5]

    def test_the_newest_entry_is_never_pruned(self, sm: StateManager) -> None:
        grow(sm, "l1", "log", 3)
        sm.delete_state(sm.register_state("l2", "log", doc())["state_id"])
        time.sleep(0.35)
        assert sm.prune().entries == 3 + 1
        assert versions(sm, "l1") == [4]
        assert versions(sm, "l2") == [2]
        assert sm.get_state_history("l2")[0]["transition"] == "delete"
        assert sm.prune().entries == 0

    def test_both_rules_keep_what_either_keeps(self, sm: StateManager) -> None:
        grow(sm, "b1", "both", 3)  # versions 1-4, old
        time.sleep(0.35)
        sm.update_state("b1", doc(n=4))
        sm.update_state("b1", doc(n=5))  # versions 5-6, recent
        # keep_history=3 alone keeps 4-6, keep_history_for alone 5-6: 4-6 stay.
        assert sm.prune(state_type="both").entries == 3
        assert versions(sm, "b1") == [4, 5, 6]
        grow(sm, "b2", "both", 5)  # all recent: the age rule keeps every entry
        assert sm.prune(state_type="both").entries == 0
        assert versions(sm, "b2") == [1, 2, 3, 4, 5, 6]

    def test_dry_run_counts_and_removes_nothing(self, sm: StateManager) -> None:
        grow(sm, "n1", "note", 6)
        sm.register_state("t1", "temp", doc())
        sm.delete_state("t1")
        time.sleep(0.35)
        dry = sm.prune(dry_run=True)
        assert (dry.entries, dry.purged, dry.dry_run) == (4 + 2, 1, True)
        assert versions(sm, "n1") == [1, 2, 3, 4, 5, 6, 7]
        assert versions(sm, "t1") == [1, 2]
        real = sm.prune()
        assert (real.entries, real.purged) == (dry.entries, dry.purged)

    def test_prune_works_in_batches(self, sm: StateManager) -> None:
        for i in range(7):
            grow(sm, f"n{i}", "note", 4)
        batches: list[tuple[str, Pruned]] = []
        report = sm.prune(
            state_type="note", batch_size=3, progress=lambda t, b: batches.append((t, b))
        )
        assert report.entries == 7 * 2 and report.states >= 7
        assert all(t == "note" and b.states <= 3 for t, b in batches) and len(batches) >= 3
        assert sum(b.entries for _, b in batches) == 14
        assert all(versions(sm, f"n{i}") == [3, 4, 5] for i in range(7))

    def test_writes_after_prune_still_conflict(self, sm: StateManager) -> None:
        grow(sm, "n1", "note", 5)
        sm.prune()
        with pytest.raises(StateConflictError) as caught:
            sm.update_state("n1", doc(n=9), expected_version=5)
        assert caught.value.actual_version == 6
        assert sm.get_state("n1")["data"] == {"n": 5}
        assert sm.update_state("n1", doc(n=9), expected_version=6)["version"] == 7
        assert sm.transition("n1", "activate")["version"] == 8
        assert versions(sm, "n1") == [4, 5, 6, 7, 8]

    def test_prune_while_writers_write(self, sm: StateManager, app_of: Flask) -> None:
        sm.register_state("n1", "note", doc(n=0))
        errors: list[BaseException] = []

        def write() -> None:
            with app_of.app_context():
                try:
                    for _ in range(40):
                        sm.atomic_update("n1", lambda d: {"n": d["n"] + 1})
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

        writers = [threading.Thread(target=write) for _ in range(2)]
        for writer in writers:
            writer.start()
        while any(w.is_alive() for w in writers):
            sm.prune(batch_size=1)
        for writer in writers:
            writer.join()
        assert errors == []
        state = sm.get_state("n1")
        assert (state["version"], state["data"]) == (81, {"n": 80})
        sm.prune()
        assert versions(sm, "n1") == [79, 80, 81]
        assert sm.get_state_history("n1")[-1]["new_data"] == {"n": 80}

    def test_recent_changes_leave_pruned_entries_out(self, sm: StateManager) -> None:
        grow(sm, "n1", "note", 4)
        sm.prune()
        recent = sm.get_recent_changes(None, limit=50)
        assert [(c["state_id"], c["version"]) for c in recent] == [
            ("n1", 5),
            ("n1", 4),
            ("n1", 3),
        ]

    def test_rollback_to_a_pruned_version_is_a_clear_error(self, sm: StateManager) -> None:
        grow(sm, "n1", "note", 5)
        sm.prune()
        with pytest.raises(StateValidationError, match=r"roll back to one of \[4, 5, 6\]"):
            sm.rollback("n1", 2)
        assert sm.rollback("n1", 4)["data"] == {"n": 3}

    # -- purging deleted states -------------------------------------------------------

    def test_deleted_states_are_purged_after_the_grace_period(self, sm: StateManager) -> None:
        grow(sm, "old", "temp", 2)
        sm.delete_state("old")
        sm.register_state("live", "temp", doc())
        assert sm.prune().purged == 0  # not yet: the grace period runs
        time.sleep(0.35)
        sm.register_state("new", "temp", doc())
        sm.delete_state("new")
        report = sm.prune()
        assert (report.purged, report.entries) == (1, 4)
        assert sm.store.get("old") is None
        assert sm.get_state_history("old") == []
        assert sm.store.get("new")["status"] == "deleted"
        assert versions(sm, "new") == [1, 2]
        assert sm.get_state("live")["version"] == 1
        assert sm.prune().purged == 0
        assert list(sm.verify_history()) == ["live", "new"]  # "old" is gone for good

    def test_a_purged_id_registered_again_starts_over(self, sm: StateManager) -> None:
        grow(sm, "t1", "temp", 3)
        sm.delete_state("t1")  # version 5
        time.sleep(0.35)
        assert sm.prune().purged == 1
        # Nothing of the old life is left, so versions start at 1 again and
        # never collide with a history entry.
        again = sm.register_state("t1", "temp", doc(life=2))
        assert again["version"] == 1
        assert sm.get_state("t1") == again
        assert sm.update_state("t1", doc(life=2, n=1))["version"] == 2
        assert versions(sm, "t1") == [1, 2]
        assert sm.get_state("t1")["data"] == {"life": 2, "n": 1}
        assert list(sm.verify_history("t1")) == ["t1"]  # a new chain, from scratch
        recent = [(c["state_id"], c["version"]) for c in sm.get_recent_changes(None, limit=50)]
        assert recent == [("t1", 2), ("t1", 1)]

    def test_global_purge_setting(self, make: MakeApp) -> None:
        manager = StateManager()
        manager.register_type("keep", purge_deleted_after=3600)
        with make(STATEMANAGER_PURGE_DELETED_AFTER=0.2).app_context():
            for state_id, type_name in (("u1", "user"), ("k1", "keep")):
                manager.register_state(state_id, type_name, doc())
                manager.delete_state(state_id)
            time.sleep(0.25)
            assert manager.prune().purged == 1
            assert manager.store.get("u1") is None
            assert manager.store.get("k1")["status"] == "deleted"

    def test_retention_options_are_checked(self) -> None:
        manager = StateManager()
        for options in (
            {"keep_history": 0},
            {"keep_history": 2.5},
            {"keep_history_for": -1},
            {"keep_history_for": "30d"},
            {"purge_deleted_after": 0},
            {"max_states": True},
            {"max_states": 0},
        ):
            with pytest.raises(ConfigurationError, match=next(iter(options))):
                manager.register_type("bad", **options)
            assert "bad" not in manager.types

    # -- max_states ---------------------------------------------------------------------

    def test_max_states_refuses_and_writes_nothing(self, sm: StateManager) -> None:
        sm.register_state("s1", "slot", doc())
        sm.register_state("s2", "slot", doc())
        with pytest.raises(StateLimitError) as caught:
            sm.register_state("s3", "slot", doc())
        assert (caught.value.limit, caught.value.value, caught.value.maximum) == ("states", 3, 2)
        assert "max_states" in str(caught.value)
        assert sm.store.get("s3") is None
        assert sm.get_state_history("s3") == []
        assert sm.search_states("slot").total == 2
        # Other types are not limited; a deleted state frees its place.
        sm.register_state("u3", "user", doc())
        sm.delete_state("s1")
        assert sm.register_state("s3", "slot", doc())["version"] == 1
        # Updates of existing states are never refused.
        assert sm.update_state("s2", doc(n=1))["version"] == 2

    def test_max_states_counts_the_creations_of_one_batch(self, sm: StateManager) -> None:
        sm.register_state("s1", "slot", doc())
        with pytest.raises(StateLimitError), sm.transaction() as tx:
            tx.register_state("s2", "slot", doc())
            tx.register_state("s3", "slot", doc())
        assert sm.search_states("slot").total == 1
        result = sm.bulk_register(
            [{"state_id": f"b{i}", "state_type": "slot", "initial_data": doc()} for i in range(3)]
        )
        assert [isinstance(o, StateLimitError) for o in result.outcomes] == [False, True, True]
        assert sm.search_states("slot").total == 2

    def test_a_delete_in_the_same_batch_frees_its_place(self, sm: StateManager) -> None:
        sm.register_state("s1", "slot", doc())
        sm.register_state("s2", "slot", doc())  # full: slot holds at most 2
        with sm.transaction() as tx:
            tx.delete_state("s2")
            tx.register_state("s3", "slot", doc())
        with sm.transaction() as tx:
            tx.delete_state("s3")
            tx.register_state("s3", "slot", doc(again=True))  # the same id, a new life
        assert sorted(s["state_id"] for s in sm.search_states("slot")) == ["s1", "s3"]
        with pytest.raises(StateLimitError), sm.transaction() as tx:
            tx.delete_state("s1")
            tx.register_state("s4", "slot", doc())
            tx.register_state("s5", "slot", doc())  # one too many, even after the delete
        assert sorted(s["state_id"] for s in sm.search_states("slot")) == ["s1", "s3"]

    def test_deletes_free_no_more_places_than_a_lowered_limit_leaves(
        self, sm: StateManager
    ) -> None:
        sm.register_type("slot", max_states=20)
        for i in range(10):
            sm.register_state(f"old{i}", "slot", doc())
        sm.register_type("slot", max_states=2)  # lowered below what the type holds
        with pytest.raises(StateLimitError) as caught, sm.transaction() as tx:
            for i in range(5):
                tx.delete_state(f"old{i}")
            for i in range(4):
                tx.register_state(f"new{i}", "slot", doc())
        assert caught.value.maximum == 2 and caught.value.value > 2
        assert "'new0'" in str(caught.value)
        assert sm.search_states("slot").total == 10
        assert [sm.store.get(f"new{i}") for i in range(4)] == [None] * 4
        assert sm.get_state("old0")["version"] == 1
        # Deleting down to the limit frees places again, in one batch.
        with sm.transaction() as tx:
            for i in range(9):
                tx.delete_state(f"old{i}")
        with sm.transaction() as tx:
            tx.delete_state("old9")
            tx.register_state("new0", "slot", doc())
            tx.register_state("new1", "slot", doc())
        assert sorted(s["state_id"] for s in sm.search_states("slot")) == ["new0", "new1"]

    def test_global_max_states_per_type(self, make: MakeApp) -> None:
        manager = StateManager()
        manager.register_type("roomy", max_states=3)
        with make(STATEMANAGER_MAX_STATES_PER_TYPE=1).app_context():
            manager.register_state("u1", "user", doc())
            with pytest.raises(StateLimitError, match="STATEMANAGER_MAX_STATES_PER_TYPE"):
                manager.register_state("u2", "user", doc())
            for i in range(3):
                manager.register_state(f"r{i}", "roomy", doc())
            with pytest.raises(StateLimitError):
                manager.register_state("r3", "roomy", doc())

    def test_max_states_is_exact_under_concurrent_registrations(
        self, sm: StateManager, app_of: Flask
    ) -> None:
        sm.register_type("slot", max_states=5)
        outcomes: list[str] = []
        start = threading.Barrier(12)

        def register(n: int) -> None:
            with app_of.app_context():
                start.wait()
                try:
                    sm.register_state(f"c{n}", "slot", doc())
                    outcomes.append("ok")
                except StateLimitError:
                    outcomes.append("refused")

        threads = [threading.Thread(target=register, args=(n,)) for n in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == ["ok"] * 5 + ["refused"] * 7
        assert sm.search_states("slot").total == 5

    @pytest.fixture
    def app_of(self, sm: StateManager) -> Flask:
        from flask import current_app

        return current_app._get_current_object()  # type: ignore[attr-defined,no-any-return]


class TestMemoryRetention(RetentionContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path) -> dict[str, Any]:
        return {"STATEMANAGER_STORE": "memory"}


class TestSQLiteRetention(RetentionContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path) -> dict[str, Any]:
        return {}


class TestPostgresRetention(RetentionContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path, postgres_url: str) -> dict[str, Any]:
        return {"STATEMANAGER_DATABASE_URI": postgres_url}


class TestPostgresCachedRetention(RetentionContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path, postgres_url: str, clean_redis: str) -> dict[str, Any]:
        return {"STATEMANAGER_DATABASE_URI": postgres_url, "STATEMANAGER_REDIS_URL": clean_redis}

    def test_a_purged_state_leaves_the_cache(self, sm: StateManager) -> None:
        store = sm.store
        assert isinstance(store, CachedStore)
        grow(sm, "t1", "temp", 3)
        sm.delete_state("t1")
        sm.store.get("t1")  # fills the cache with the tombstone
        assert store.peek("t1")["version"] == 5
        time.sleep(0.35)
        assert sm.prune().purged == 1
        assert store.peek("t1") is None
        sm.register_state("t1", "temp", doc(life=2))
        for _ in range(2):  # a miss that fills, then a hit
            assert sm.get_state("t1")["data"] == {"life": 2}
            assert sm.get_state("t1")["version"] == 1


class TestRedisRetention(RetentionContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path, clean_redis: str) -> dict[str, Any]:
        return {"STATEMANAGER_STORE": "redis", "STATEMANAGER_REDIS_URL": clean_redis}

    @pytest.fixture
    def client(self, clean_redis: str) -> Iterator[redis.Redis]:
        client = redis.Redis.from_url(clean_redis)
        yield client
        client.close()

    def other_process(self, sm: StateManager) -> RedisStore:
        """A second Redis store on the same server, as another process has."""
        store = sm.store
        assert isinstance(store, RedisStore)
        return RedisStore(store.client, prefix=store.prefix)

    def test_a_purged_id_reborn_elsewhere_at_the_same_version(
        self, sm: StateManager, tmp_path: Path, store_config: dict[str, Any]
    ) -> None:
        """This process remembers the tombstone at version 3; another purges the
        id and brings it back to a live version 3. Registering here must see it."""
        grow(sm, "t1", "temp", 1)
        sm.delete_state("t1")  # version 3, remembered by this process's store
        time.sleep(0.35)
        other = make_app(tmp_path / "other", **store_config)
        StateManager().init_app(other)
        with other.app_context():
            assert sm.prune().purged == 1
            grow(sm, "t1", "temp", 2)  # versions 1-3 of a new life
        with pytest.raises(StateExistsError):
            sm.register_state("t1", "temp", doc(life=3))
        assert sm.get_state("t1")["data"] == {"n": 2}
        assert versions(sm, "t1") == [1, 2, 3]
        assert list(sm.verify_history("t1")) == ["t1"]

    def test_a_rewrite_finds_entries_by_version_while_prune_trims(self, sm: StateManager) -> None:
        """rotate-keys reads a batch, a prune trims it, then the rewrite lands:
        every entry left is rewritten, none skipped for having moved."""
        grow(sm, "n1", "note", 5)  # versions 1-6; the note type keeps 3
        pruned: list[int] = []

        def change(entry: Change) -> Change:
            if not pruned:
                pruned.append(sm.prune().entries)  # between the read and the write
            return Change(entry, actor="rewritten")

        _total, batches = sm.store.rewrite(lambda state: None, change)
        list(batches)
        assert pruned == [3]
        history = sm.get_state_history("n1")
        assert [c["version"] for c in history] == [4, 5, 6]
        assert [c["actor"] for c in history] == ["rewritten"] * 3

    def test_the_version_is_history_plus_pruned(
        self, sm: StateManager, client: redis.Redis
    ) -> None:
        grow(sm, "n1", "note", 5)
        sm.prune()
        assert client.llen("statemanager:history:{n1}") == 3
        assert client.get("statemanager:pruned:{n1}") == b"3"
        # The locked way (a fresh store has no records) and the one-round-trip way.
        fresh = self.other_process(sm)
        runtime = sm._runtime()
        runtime.store = fresh
        assert sm.update_state("n1", doc(n=6))["version"] == 7
        assert sm.update_state("n1", doc(n=7))["version"] == 8
        assert versions(sm, "n1") == [4, 5, 6, 7, 8]

    def test_a_stale_record_after_prune_still_conflicts(self, sm: StateManager) -> None:
        grow(sm, "n1", "note", 2)
        other = self.other_process(sm)
        assert other.get("n1")["version"] == 3  # the other process remembers version 3
        sm.update_state("n1", doc(n=3))
        sm.update_state("n1", doc(n=4))
        sm.prune()
        runtime = sm._runtime()
        runtime.store = other
        # Its remembered record is stale: the commit refuses it, the locked
        # way reads version 5 and the write lands as version 6.
        assert sm.update_state("n1", doc(n=5))["version"] == 6
        assert versions(sm, "n1") == [3, 4, 5, 6]
        with pytest.raises(StateConflictError):
            sm.update_state("n1", doc(n=6), expected_version=5)

    def test_a_resent_commit_is_recognised_after_prune(self, sm: StateManager) -> None:
        grow(sm, "n1", "note", 5)
        sm.prune()
        store = sm.store
        assert isinstance(store, RedisStore)
        seen: dict[str, State | None] = {}

        def plan(rows: Mapping[str, State | None], heads: Mapping[str, str | None]) -> list[Write]:
            seen.update(rows)
            row = rows["n1"]
            assert row is not None
            from flask_statemanager.engine import expiry_write

            write = expiry_write(row, row["updated_at"] + timedelta(seconds=1))
            seal([write.change], heads)
            return [write]

        writes = store.apply(["n1"], plan)
        store._commit(
            ["n1"], seen, writes, "another token", read={"n1": None}
        )  # as a resent EVALSHA would
        assert versions(sm, "n1") == [4, 5, 6, 7]
        assert list(sm.verify_history("n1")) == ["n1"]  # pruned: anchored at version 4

    def test_a_dropped_tombstone_after_prune_goes_on_from_its_version(
        self, sm: StateManager, client: redis.Redis
    ) -> None:
        grow(sm, "n1", "note", 4)
        sm.delete_state("n1")  # version 6
        sm.prune()
        assert versions(sm, "n1") == [4, 5, 6]
        client.delete("statemanager:state:{n1}")  # as its tombstone_ttl would
        assert sm.register_state("n1", "note", doc())["version"] == 7

    def test_a_dropped_tombstone_is_purged(self, sm: StateManager, client: redis.Redis) -> None:
        grow(sm, "t1", "temp", 1)
        sm.delete_state("t1")
        client.delete("statemanager:state:{t1}")  # as its tombstone_ttl would
        time.sleep(0.35)
        assert sm.prune().purged == 1
        assert not client.exists(
            "statemanager:history:{t1}", "statemanager:pruned:{t1}", "statemanager:tombstones:temp"
        )
        assert sm.register_state("t1", "temp", doc())["version"] == 1

    def test_an_id_registered_under_another_type_is_not_pruned_as_the_old(
        self, sm: StateManager, client: redis.Redis
    ) -> None:
        for state_id in ("x", "y"):
            sm.register_state(state_id, "temp", doc())
            sm.delete_state(state_id)
        sm.register_state("x", "user", doc())  # a new life, another type
        client.delete("statemanager:state:{y}")  # as its tombstone_ttl would...
        sm._runtime().store = self.other_process(sm)  # ...and in a process that never saw it,
        sm.register_state("y", "user", doc())  # so the commit cannot tell its old type
        assert client.zscore("statemanager:tombstones:temp", "y") is not None
        time.sleep(0.35)
        assert sm.prune().purged == 0
        assert sm.get_state("x")["version"] == sm.get_state("y")["version"] == 3
        assert versions(sm, "y") == [1, 2, 3]
        assert client.zcard("statemanager:tombstones:temp") == 0  # the stale member went

    def test_a_locked_state_waits_for_the_next_run(
        self, sm: StateManager, client: redis.Redis
    ) -> None:
        grow(sm, "n1", "note", 5)
        client.set("statemanager:lock:{n1}", "a writer", px=5000)
        assert sm.prune().entries == 0
        client.delete("statemanager:lock:{n1}")
        assert sm.prune().entries == 3


# -- the command ----------------------------------------------------------------------


def test_prune_command(tmp_path: Path) -> None:
    manager = StateManager()
    manager.register_type("note", keep_history=2)
    manager.register_type("temp", purge_deleted_after=0.2)
    app = make_app(tmp_path)
    manager.init_app(app)
    with app.app_context():
        for i in range(3):
            grow(manager, f"n{i}", "note", 3)
        manager.register_state("t1", "temp", doc())
        manager.delete_state("t1")
    time.sleep(0.25)
    runner = app.test_cli_runner()
    dry = runner.invoke(args=["states", "prune", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "Would remove 8 history entries and purged 1 deleted state(s)" in dry.output
    done = runner.invoke(args=["states", "prune", "--type", "note", "--batch-size", "2"])
    assert done.exit_code == 0, done.output
    assert "Removed 6 history entries and purged 0 deleted state(s) of 3 examined" in done.output
    assert "note: 6 history entries, 0 deleted state(s)" in done.output
    done = runner.invoke(args=["states", "prune"])
    assert "Removed 2 history entries and purged 1 deleted state(s)" in done.output
    with app.app_context():
        assert versions(manager, "n0") == [3, 4]
        assert manager.store.get("t1") is None

    unknown = runner.invoke(args=["states", "prune", "--type", "nosuch"])
    assert unknown.exit_code != 0 and "Unknown state type 'nosuch'" in unknown.output
    plain = runner.invoke(args=["states", "prune", "--type", "user"])
    assert plain.exit_code != 0 and "has no retention" in plain.output
    bad = runner.invoke(args=["states", "prune", "--batch-size", "0"])
    assert bad.exit_code != 0 and "--batch-size" in bad.output
