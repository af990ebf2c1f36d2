"""Data migrations: upgrade on read, writes from the upgraded record, ``flask states migrate``.

Run on every store: memory, SQLite, PostgreSQL, PostgreSQL with the Redis
cache, and the Redis store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from flask import Flask

from flask_statemanager import (
    ConfigurationError,
    MigrationError,
    StateManager,
    StateValidationError,
)
from flask_statemanager.records import State

from .conftest import make_app


def v1(i: int) -> dict[str, Any]:
    """A customer in the seed's 1.0 shape."""
    return {"data": {"contact_info": {"email": f"c{i}@example.com", "phone": str(i)}, "n": 0}}


def to_1_9(data: dict[str, Any]) -> dict[str, Any]:
    data.setdefault("preferences", {})
    return data


def to_1_10(data: dict[str, Any]) -> dict[str, Any]:
    contact = data.pop("contact_info")
    return {**data, "email": contact["email"], "phone": contact["phone"]}


def register_migrations(manager: StateManager) -> None:
    manager.register_migration("customer", "1.9", "1.10", to_1_10)  # any order
    manager.register_migration("customer", "1.0", "1.9", to_1_9)


class MigrationContract:
    @pytest.fixture
    def store_config(self, tmp_path: Path) -> dict[str, Any]:
        raise AssertionError("subclasses choose a store")

    @pytest.fixture
    def app(self, tmp_path: Path, store_config: dict[str, Any]) -> Iterator[Flask]:
        app = make_app(tmp_path, **store_config)
        manager = StateManager()
        manager.register_type("customer", indexes=["data.n"])
        manager.init_app(app)
        with app.app_context():
            manager.create_all()
            manager.store.reset()
        yield app

    @pytest.fixture
    def sm(self, app: Flask) -> Iterator[StateManager]:
        with app.app_context():
            yield StateManager()

    def test_reads_return_records_upgraded_without_writing(self, sm: StateManager) -> None:
        for i in range(3):
            sm.register_state(f"c{i}", "customer", v1(i))
        register_migrations(sm)
        state = sm.get_state("c1")
        assert state["data"] == {
            "n": 0,
            "preferences": {},
            "email": "c1@example.com",
            "phone": "1",
        }
        assert state["metadata"]["version"] == "1.10"
        assert state["version"] == 1
        assert sm.bulk_get(["c0", "c2"])["c2"]["data"]["email"] == "c2@example.com"
        page = sm.search_states("customer", {"data.n": 0}, order_by="state_id")
        assert [s["metadata"]["version"] for s in page] == ["1.10"] * 3
        # Nothing was written: the stored record and its history are as before.
        stored = sm.store.get("c1")
        assert stored is not None and stored["metadata"]["version"] == "1.0"
        assert "contact_info" in stored["data"]
        assert len(sm.get_state_history("c1")) == 1

    def test_versions_compare_as_versions(self, sm: StateManager) -> None:
        register_migrations(sm)
        sm.register_state("new", "customer", {"data": {"email": "x", "n": 0}})
        assert sm.get_state("new")["metadata"]["version"] == "1.10"  # created at the newest
        sm.register_state("mid", "customer", {**v1(1), "metadata": {"version": "1.9"}})
        mid = sm.get_state("mid")
        assert mid["data"]["email"] == "c1@example.com" and "preferences" not in mid["data"]
        sm.register_state("odd", "customer", {**v1(2), "metadata": {"version": "1.5"}})
        assert sm.get_state("odd")["data"]["preferences"] == {}  # inside 1.0 -> 1.9
        done = {"data": {"contact_info": "left alone"}, "metadata": {"version": "1.10.0"}}
        sm.register_state("done", "customer", done)
        assert sm.get_state("done")["data"] == {"contact_info": "left alone"}
        with pytest.raises(ConfigurationError, match="must be higher"):
            sm.register_migration("customer", "1.10", "1.9", to_1_9)
        with pytest.raises(ConfigurationError, match="not a version"):
            sm.register_migration("customer", "one", "2.0", to_1_9)
        with pytest.raises(ConfigurationError, match="function"):
            sm.register_migration("customer", "2.0", "3.0", "not callable")  # type: ignore[arg-type]

    def test_writes_plan_from_the_upgraded_record(self, sm: StateManager) -> None:
        sm.register_state("c1", "customer", v1(1))
        sm.transition("c1", "activate")
        register_migrations(sm)
        patched = sm.patch_state("c1", {"n": 5}, actor="alice")
        assert patched["data"]["email"] == "c1@example.com" and patched["data"]["n"] == 5
        assert patched["metadata"]["version"] == "1.10" and patched["version"] == 3
        stored = sm.store.get("c1")
        assert stored is not None and stored["metadata"]["version"] == "1.10"
        change = sm.get_state_history("c1")[-1]
        assert change["old_data"] == v1(1)["data"]  # what was stored before
        assert change["new_data"] == patched["data"]
        assert change["metadata"]["migrated_from"] == "1.0"
        assert change["metadata"]["migrated_to"] == "1.10"
        # Replacing metadata keeps the schema version, so nothing migrates twice.
        updated = sm.update_state("c1", {"metadata": {"tier": "gold"}})
        assert updated["metadata"] == {"tier": "gold", "version": "1.10"}
        assert sm.get_state("c1")["data"] == patched["data"]
        assert sm.atomic_update("c1", lambda d: {**d, "n": d["n"] + 1})["data"]["n"] == 6

    def test_migrate_command_upgrades_everything_in_batches(
        self, sm: StateManager, app: Flask
    ) -> None:
        for i in range(7):
            sm.register_state(f"c{i}", "customer", v1(i))
        sm.register_state("gone", "customer", v1(99))
        sm.delete_state("gone")
        sm.register_state("u1", "user", {"data": {}})
        register_migrations(sm)
        runner = app.test_cli_runner()
        result = runner.invoke(args=["states", "migrate", "--batch-size", "3"])
        assert result.exit_code == 0, result.output
        assert "Upgraded 7 state(s); 0 already at the newest version." in result.output
        for i in range(7):
            stored = sm.store.get(f"c{i}")
            assert stored is not None and stored["version"] == 2
            assert stored["metadata"]["version"] == "1.10"
            assert stored["data"]["email"] == f"c{i}@example.com"
            change = sm.get_state_history(f"c{i}")[-1]
            assert change["actor"] == "migration" and change["transition"] == "update"
            assert change["old_data"] == v1(i)["data"]
            assert change["metadata"]["from_status"] == change["metadata"]["to_status"]
        again = runner.invoke(args=["states", "migrate", "--type", "customer"])
        assert again.exit_code == 0, again.output
        assert "Upgraded 0 state(s); 7 already at the newest version." in again.output
        assert sm.get_state("c0")["version"] == 2
        none = runner.invoke(args=["states", "migrate", "--type", "user"])
        assert none.exit_code != 0 and "no data migrations" in none.output
        unknown = runner.invoke(args=["states", "migrate", "--type", "nope"])
        assert unknown.exit_code != 0 and "Unknown state type 'nope'" in unknown.output
        bad = runner.invoke(args=["states", "migrate", "--batch-size", "0"])
        assert bad.exit_code != 0 and "batch-size" in bad.output

    def test_an_interrupted_migration_resumes(self, sm: StateManager) -> None:
        # More than Redis keeps in a compact sorted set, so its ZSCAN pages too.
        count = 150
        items = [
            {"state_id": f"c{i}", "state_type": "customer", "initial_data": v1(i)}
            for i in range(count)
        ]
        assert sm.bulk_register(items).ok
        register_migrations(sm)
        first = sm.migrate_states("customer", batch_size=40)
        assert first.total == count
        done = next(first.batches)  # then the process is "killed"
        assert 0 < done < count and first.upgraded == done
        second = sm.migrate_states(batch_size=40)
        assert sum(second.batches) >= count
        assert second.upgraded == count - done and second.current >= done
        for i in range(count):
            actors = [c["actor"] for c in sm.get_state_history(f"c{i}")]
            assert actors == [None, "migration"]  # each state migrated exactly once

    def test_validators_see_the_upgraded_data_even_without_new_data(self, sm: StateManager) -> None:
        sm.register_state("c1", "customer", v1(1))
        register_migrations(sm)
        seen: list[dict[str, Any]] = []

        def needs_email(state: Any) -> bool:  # a data validator, not a transition guard
            seen.append(dict(state["data"]))
            return "@" in state["data"].get("email", "")

        sm.register_validator("customer", needs_email)
        sm.transition("c1", "activate")  # no data given: the migration rewrote it
        assert seen and seen[-1]["email"] == "c1@example.com"
        sm.register_migration("customer", "1.10", "2.0", lambda d: {**d, "email": "none"})
        with pytest.raises(StateValidationError):
            sm.transition("c1", "suspend")  # the upgraded data fails: nothing written
        stored = sm.store.get("c1")
        assert stored is not None and stored["version"] == 2

    def test_expiry_listeners_and_reads_get_the_upgraded_record(self, sm: StateManager) -> None:
        sm.register_state("c1", "customer", v1(1), ttl=0.05)
        sm.register_state("c2", "customer", v1(2), ttl=0.05)
        register_migrations(sm)
        heard: list[tuple[Any, Any]] = []
        sm.register_callback(
            "customer_expired", lambda state_id, old, new, t: heard.append((old, new))
        )
        time.sleep(0.1)
        assert sm.sweep_expired() == 2
        assert len(heard) == 2
        for old, new in heard:
            assert "email" in new["data"] and "contact_info" not in new["data"]
            assert new["metadata"]["version"] == "1.10" and "email" in old["data"]
        # An expired record whose migration fails reads as absent, not as an error.
        sm.register_state("c3", "customer", v1(3), ttl=0.05)
        sm.register_migration("customer", "1.10", "2.0", lambda d: 1 / 0)
        time.sleep(0.1)
        assert sm.get_state("c3") is None
        assert sm.store.get("c3")["status"] == "expired"

    def test_a_state_deleted_while_migrating_is_skipped(
        self, sm: StateManager, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for i in range(3):
            sm.register_state(f"c{i}", "customer", v1(i))
        register_migrations(sm)
        scan = sm.store.scan

        def scan_then_delete(*args: Any, **kwargs: Any) -> Iterator[list[State]]:
            for batch in scan(*args, **kwargs):
                sm.delete_state("c1")  # a user deletes it after migrate read it
                yield batch

        monkeypatch.setattr(sm.store, "scan", scan_then_delete)
        run = sm.migrate_states("customer")
        sum(run.batches)
        assert run.upgraded == 2
        assert sm.get_state("c1") is None
        for i in (0, 2):
            assert [c["actor"] for c in sm.get_state_history(f"c{i}")] == [None, "migration"]

    def test_concurrent_user_writes_are_never_lost(self, sm: StateManager, app: Flask) -> None:
        for i in range(20):
            sm.register_state(f"c{i}", "customer", v1(i))
        register_migrations(sm)
        increments = 15
        errors: list[BaseException] = []

        def bump() -> None:
            try:
                with app.app_context():
                    manager = StateManager()
                    for _ in range(increments):
                        for i in (0, 7, 19):
                            manager.atomic_update(
                                f"c{i}", lambda d: {**d, "n": d["n"] + 1}, retries=100
                            )
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        worker = threading.Thread(target=bump)
        worker.start()
        for _ in range(3):
            sum(sm.migrate_states(batch_size=4).batches)
        worker.join()
        assert not errors
        sum(sm.migrate_states(batch_size=4).batches)
        for i in range(20):
            state = sm.get_state(f"c{i}")
            stored = sm.store.get(f"c{i}")
            assert stored is not None and stored["metadata"]["version"] == "1.10"
            assert state["data"]["n"] == (increments if i in (0, 7, 19) else 0)
            versions = [c["version"] for c in sm.get_state_history(f"c{i}")]
            assert versions == list(range(1, state["version"] + 1))

    def test_a_failing_migration_names_the_state_and_versions(
        self, sm: StateManager, app: Flask
    ) -> None:
        sm.register_state("c1", "customer", v1(1))
        sm.register_state("c2", "customer", {"data": {"n": 0}})  # no contact_info
        register_migrations(sm)
        with pytest.raises(MigrationError) as caught:
            sm.get_state("c2")
        error = caught.value
        assert (error.state_id, error.from_version, error.to_version) == ("c2", "1.9", "1.10")
        assert "'c2'" in str(error) and "1.9 to 1.10" in str(error) and "KeyError" in str(error)
        with pytest.raises(MigrationError):
            sm.patch_state("c2", {"n": 1})
        result = app.test_cli_runner().invoke(args=["states", "migrate"])
        assert result.exit_code != 0
        assert "'c2'" in result.output and "1.9 to 1.10" in result.output
        assert sm.store.get("c2")["version"] == 1  # type: ignore[index]
        assert sm.store.get("c1")["version"] == 2  # type: ignore[index]  # its own batch item

        def forgets_to_return(data: dict[str, Any]) -> Any:
            data["preferences"] = {}

        sm.register_migration("customer", "1.0", "1.9", forgets_to_return)
        sm.register_state("c3", "customer", {**v1(3), "metadata": {"version": "1.0"}})
        with pytest.raises(MigrationError, match="returned NoneType, not the new data dict"):
            sm.get_state("c3")
        sm.delete_state("c3")  # a broken migration never blocks a delete
        assert sm.get_state("c3") is None
        assert sm.get_state_history("c3")[-1]["old_data"] == v1(3)["data"]

    def test_a_migration_s_output_is_checked_even_when_a_write_keeps_the_data(
        self, sm: StateManager
    ) -> None:
        # A transition without new data keeps the record's data; a stored
        # document is not walked again, but a migration's output is new input.
        sm.register_type("job", lifecycle={"create": (None, "open"), "close": ("open", "done")})
        sm.register_state("j1", "job", {"data": {"n": 1}})
        sm.register_migration("job", "1.0", "2.0", lambda d: {**d, "tags": {"a", "b"}})
        with pytest.raises(StateValidationError, match=r"data\.tags: set is not a JSON value"):
            sm.transition("j1", "close")
        stored = sm.store.get("j1")
        assert stored is not None and (stored["version"], stored["status"]) == (1, "open")

    def test_migrations_bypass_a_lifecycle_without_update(
        self, sm: StateManager, app: Flask
    ) -> None:
        sm.register_type("ticket", lifecycle={"create": (None, "open"), "close": ("open", "shut")})
        sm.register_state("t1", "ticket", {"data": {"title": "x"}})
        sm.transition("t1", "close")
        sm.register_migration("ticket", "1.0", "2.0", lambda d: {**d, "priority": "low"})
        result = app.test_cli_runner().invoke(args=["states", "migrate", "--type", "ticket"])
        assert result.exit_code == 0, result.output
        stored = sm.store.get("t1")
        assert stored is not None and stored["status"] == "shut"
        assert stored["data"]["priority"] == "low"


class TestMemoryMigrations(MigrationContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path) -> dict[str, Any]:
        return {"STATEMANAGER_STORE": "memory"}

    def test_with_encrypted_fields(self, tmp_path: Path) -> None:
        manager = StateManager()
        manager.register_type("patient", encrypted_fields=["data.ssn"])
        app = make_app(
            tmp_path,
            STATEMANAGER_STORE="memory",
            STATEMANAGER_ENCRYPTION_KEYS=[Fernet.generate_key()],
        )
        manager.init_app(app)
        with app.app_context():
            manager.register_state("p1", "patient", {"data": {"ssn": "123"}})
            manager.register_migration("patient", "1.0", "2.0", lambda d: {**d, "ssn_v2": True})
            assert manager.get_state("p1")["data"] == {"ssn": "123", "ssn_v2": True}
            assert sum(manager.migrate_states().batches) == 1
            stored = manager.store.get("p1")
            assert stored is not None and stored["data"]["ssn"].startswith("fernet:")
            assert stored["metadata"]["version"] == "2.0"
            change = manager.get_state_history("p1")[-1]
            assert change["old_data"] == {"ssn": "123"} and change["actor"] == "migration"


class TestSQLiteMigrations(MigrationContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path) -> dict[str, Any]:
        return {}


class TestPostgresMigrations(MigrationContract):
    @pytest.fixture
    def store_config(self, postgres_url: str) -> dict[str, Any]:
        return {"STATEMANAGER_DATABASE_URI": postgres_url}


class TestPostgresCachedMigrations(MigrationContract):
    @pytest.fixture
    def store_config(self, postgres_url: str, clean_redis: str) -> dict[str, Any]:
        return {"STATEMANAGER_DATABASE_URI": postgres_url, "STATEMANAGER_REDIS_URL": clean_redis}


class TestRedisStoreMigrations(MigrationContract):
    @pytest.fixture
    def store_config(self, clean_redis: str) -> dict[str, Any]:
        return {"STATEMANAGER_STORE": "redis", "STATEMANAGER_REDIS_URL": clean_redis}
