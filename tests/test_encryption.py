"""Encryption at rest: plaintext to callers, ciphertext in every store, keys checked at start-up.

Each store's raw rows are read behind the extension's back (SQL tables, Redis
keys of the store and of the cache, the memory store's dictionaries) and must
hold no plaintext of an encrypted field.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from cryptography.fernet import Fernet
from flask import Flask

from flask_statemanager import (
    ConfigurationError,
    StateManager,
    StateValidationError,
    signals,
)
from flask_statemanager.stores.cache import CachedStore
from flask_statemanager.stores.memory import MemoryStore

from .conftest import make_app

KEY_A = Fernet.generate_key()
KEY_B = Fernet.generate_key()
SSN = "078-05-1120"
CARD = "4111111111111111"
SECRETS = (SSN, CARD, "1120-new")


def patient(**data: Any) -> dict[str, Any]:
    return {"name": "patient", "data": data}


def register_types(manager: StateManager) -> None:
    manager.register_type(
        "patient",
        indexes=["data.ward"],
        encrypted_fields=["data.ssn", "data.card.number", "metadata.note"],
    )


class EncryptionContract:
    """What encryption means on one store; subclasses give ``store_config`` and ``raw``."""

    #: Whether a second ``init_app`` sees the first one's data (not so in memory).

    @pytest.fixture
    def store_config(self, tmp_path: Path) -> dict[str, Any]:
        raise AssertionError("subclasses choose a store")

    @pytest.fixture
    def app(self, tmp_path: Path, store_config: dict[str, Any]) -> Iterator[Flask]:
        app = make_app(tmp_path, STATEMANAGER_ENCRYPTION_KEYS=[KEY_A], **store_config)
        manager = StateManager()
        manager.init_app(app)  # empty the store before the key check can see old rows
        with app.app_context():
            manager.create_all()
            manager.store.reset()
        register_types(manager)
        manager.init_app(app)
        yield app

    @pytest.fixture
    def sm(self, app: Flask) -> Iterator[StateManager]:
        with app.app_context():
            yield StateManager()

    def raw(self, app: Flask) -> str:
        """Every stored document of the store (and its cache), as text."""
        raise AssertionError("subclasses read their store")

    def write_some(self, sm: StateManager) -> None:
        sm.register_state(
            "p1",
            "patient",
            {
                "data": {"ssn": SSN, "card": {"number": CARD}, "ward": "a"},
                "metadata": {"note": SSN},
            },
        )
        sm.transition("p1", "activate")
        sm.patch_state("p1", {"ward": "b"})
        sm.register_state("p2", "patient", patient(ssn=SSN, ward="a"))
        sm.update_state("p2", patient(ssn="1120-new", ward="a"))
        sm.register_state("p3", "patient", patient(ssn=SSN))
        sm.delete_state("p3")

    def test_callers_see_plaintext_and_the_store_only_ciphertext(
        self, sm: StateManager, app: Flask
    ) -> None:
        self.write_some(sm)
        state = sm.get_state("p1")
        assert state["data"] == {"ssn": SSN, "card": {"number": CARD}, "ward": "b"}
        assert state["metadata"]["note"] == SSN and state["version"] == 3
        assert sm.get_state("p1")["data"]["ssn"] == SSN  # a second read (a cache hit)
        assert sm.bulk_get(["p1", "p2"])["p2"]["data"]["ssn"] == "1120-new"
        page = sm.search_states("patient", {"data.ward": "a"})
        assert [s["data"]["ssn"] for s in page] == ["1120-new"]
        history = sm.get_state_history("p1")
        assert [c["new_data"]["ssn"] for c in history] == [SSN, SSN, SSN]
        assert history[2]["old_data"]["card"] == {"number": CARD}
        assert sm.get_state_history("p3")[-1]["old_data"]["ssn"] == SSN
        recent = sm.get_recent_changes(limit=20)
        assert {c["new_data"]["ssn"] for c in recent if c["new_data"]} == {SSN, "1120-new"}
        assert sm.get_changes_by_transition("p2", "update")[0]["old_data"]["ssn"] == SSN
        rolled = sm.rollback("p2", 1)
        assert rolled["data"]["ssn"] == SSN

        stored = self.raw(app)
        assert "fernet:" in stored
        for secret in SECRETS:
            assert secret not in stored, f"plaintext {secret!r} found in the store"
        assert '"ward"' in stored or "ward" in stored  # other fields stay readable

    def test_signals_and_callbacks_get_plaintext(self, sm: StateManager, app: Flask) -> None:
        seen: list[Any] = []
        sm.register_callback("patient_*", lambda *args: seen.append(args[2]["data"]["ssn"]))

        def receiver(sender: Any, **kw: Any) -> None:
            seen.append(kw["change"]["new_data"]["ssn"])

        with signals.state_changed.connected_to(receiver, app):
            sm.register_state("p1", "patient", patient(ssn=SSN))
            sm.update_state("p1", patient(ssn="1120-new"))
        assert sorted(seen) == sorted([SSN, SSN, "1120-new", "1120-new"])

    def test_expiry_and_transactions_keep_fields_encrypted(
        self, sm: StateManager, app: Flask
    ) -> None:
        sm.register_state("p1", "patient", patient(ssn=SSN), ttl=0.05)
        with sm.transaction() as tx:
            tx.register_state("p2", "patient", patient(ssn=SSN))
            tx.patch_state("p2", {"card": {"number": CARD}})
        time.sleep(0.1)
        expired = sm.get_state("p1", include_expired=True)  # records the EXPIRE change
        assert expired is not None and expired["status"] == "expired"
        assert expired["data"]["ssn"] == SSN
        assert sm.get_state_history("p1")[-1]["new_data"]["ssn"] == SSN
        assert sm.get_state("p2")["data"]["card"]["number"] == CARD
        stored = self.raw(app)
        assert SSN not in stored and CARD not in stored

    def test_filtering_on_an_encrypted_field_is_refused(self, sm: StateManager) -> None:
        sm.register_state("p1", "patient", patient(ssn=SSN, card={"number": CARD}))
        for filters in (
            {"data.ssn": SSN},
            {"data.card__exists": True},
            {"data.card.number__exists": True},
            {"metadata.note__contains": "0"},
        ):
            with pytest.raises(StateValidationError, match="encrypted field"):
                sm.search_states("patient", filters)
        with pytest.raises(StateValidationError, match="encrypted field"):
            sm.search_states(None, {"data.ssn": SSN})  # every type's fields count
        assert sm.search_states("patient", {"data.other": 1}).total == 0

    def test_rotate_keys_rewrites_ciphertext_and_nothing_else(
        self, sm: StateManager, app: Flask
    ) -> None:
        self.write_some(sm)
        before = self.raw(app)
        versions = {i: sm.get_state(i)["version"] for i in ("p1", "p2")}
        history = {i: sm.get_state_history(i) for i in ("p1", "p2", "p3")}
        result = app.test_cli_runner().invoke(args=["states", "rotate-keys", "--batch-size", "2"])
        assert result.exit_code == 0, result.output
        assert "Re-encrypted 3 state(s) and 7 history entries" in result.output
        after = self.raw(app)
        tokens_before = set(re.findall(r"fernet:[\w=-]+", before))
        tokens_after = set(re.findall(r"fernet:[\w=-]+", after))
        assert tokens_after and not tokens_before & tokens_after
        assert {i: sm.get_state(i)["version"] for i in ("p1", "p2")} == versions
        assert {i: sm.get_state_history(i) for i in ("p1", "p2", "p3")} == history


class PersistentEncryptionContract(EncryptionContract):
    """What needs the stored data to outlive an ``init_app`` (every store but memory)."""

    def test_rotation_to_a_new_key(self, sm: StateManager, app: Flask) -> None:
        self.write_some(sm)
        manager = StateManager()
        app.config["STATEMANAGER_ENCRYPTION_KEYS"] = f"{KEY_B.decode()}, {KEY_A.decode()}"
        manager.init_app(app)
        with app.app_context():
            assert manager.get_state("p1")["data"]["ssn"] == SSN  # old key still opens
            manager.update_state("p2", patient(ssn=SSN, ward="c"))  # written with key B
            result = app.test_cli_runner().invoke(args=["states", "rotate-keys"])
            assert result.exit_code == 0, result.output
        app.config["STATEMANAGER_ENCRYPTION_KEYS"] = [KEY_B]
        manager.init_app(app)  # the old key is gone: everything must open with B
        with app.app_context():
            assert manager.get_state("p1")["data"]["card"]["number"] == CARD
            assert manager.get_state("p2")["data"] == {"ssn": SSN, "ward": "c"}
            assert [c["version"] for c in manager.get_state_history("p2")] == [1, 2, 3]
            assert manager.get_state_history("p3")[0]["new_data"]["ssn"] == SSN
        # Without the new key, the start-up check finds the stored ciphertext unreadable.
        app.config["STATEMANAGER_ENCRYPTION_KEYS"] = [KEY_A]
        with pytest.raises(ConfigurationError, match="no key in STATEMANAGER_ENCRYPTION_KEYS"):
            manager.init_app(app)

    def test_wrong_key_fails_at_init_app(self, sm: StateManager, app: Flask) -> None:
        sm.register_state("p1", "patient", patient(ssn=SSN))
        app.config["STATEMANAGER_ENCRYPTION_KEYS"] = [KEY_B]
        with pytest.raises(ConfigurationError, match="Cannot decrypt data.ssn of state 'p1'"):
            StateManager().init_app(app)

    def test_plaintext_from_before_the_field_was_encrypted(
        self, sm: StateManager, app: Flask
    ) -> None:
        manager = StateManager()
        manager.register_type("legacy")
        manager.register_state("l1", "legacy", {"data": {"pin": "9911"}})
        manager.register_type("legacy", encrypted_fields=["data.pin"])
        manager.init_app(app)
        with app.app_context():
            assert manager.get_state("l1")["data"]["pin"] == "9911"
            assert "9911" in self.raw(app)
            result = app.test_cli_runner().invoke(args=["states", "rotate-keys"])
            assert result.exit_code == 0, result.output
            assert "9911" not in self.raw(app)
            assert manager.get_state("l1")["data"]["pin"] == "9911"
            assert manager.get_state_history("l1")[0]["new_data"] == {"pin": "9911"}


class TestMemoryEncryption(EncryptionContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path) -> dict[str, Any]:
        return {"STATEMANAGER_STORE": "memory"}

    def raw(self, app: Flask) -> str:
        with app.app_context():
            store = StateManager().store
        assert isinstance(store, MemoryStore)
        documents: list[Any] = [dict(s) for s in store._states.values()]
        documents += [dict(c) for entries in store._history.values() for c in entries]
        return repr(documents)


def _sql_raw(url: str) -> str:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT CAST(data AS TEXT) || CAST(metadata AS TEXT) FROM statemanager_states"
            ).all()
            rows += conn.exec_driver_sql(
                "SELECT COALESCE(CAST(old_data AS TEXT), '') "
                "|| COALESCE(CAST(new_data AS TEXT), '') FROM statemanager_history"
            ).all()
    finally:
        engine.dispose()
    return "\n".join(r[0] for r in rows)


def _redis_raw(url: str) -> str:
    """Every value of every key in the test Redis database, as text."""
    client = redis.Redis.from_url(url)
    out: list[str] = []
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            if kind == "string":
                values = [client.get(key)]
            elif kind == "list":
                values = client.lrange(key, 0, -1)
            elif kind == "zset":
                values = client.zrange(key, 0, -1)
            elif kind == "hash":
                values = [*client.hgetall(key).values()]
            else:
                values = list(client.smembers(key))
            out += [key.decode(), *(v.decode("utf-8", "replace") for v in values if v)]
    finally:
        client.close()
    return "\n".join(out)


class TestSQLiteEncryption(PersistentEncryptionContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path) -> dict[str, Any]:
        return {}

    def raw(self, app: Flask) -> str:
        return _sql_raw("sqlite:///" + str(Path(app.instance_path) / "statemanager.sqlite3"))


class TestPostgresEncryption(PersistentEncryptionContract):
    @pytest.fixture
    def store_config(self, postgres_url: str) -> dict[str, Any]:
        return {"STATEMANAGER_DATABASE_URI": postgres_url}

    def raw(self, app: Flask) -> str:
        return _sql_raw(app.config["STATEMANAGER_DATABASE_URI"])


class TestPostgresCachedEncryption(PersistentEncryptionContract):
    @pytest.fixture
    def store_config(self, postgres_url: str, clean_redis: str) -> dict[str, Any]:
        return {"STATEMANAGER_DATABASE_URI": postgres_url, "STATEMANAGER_REDIS_URL": clean_redis}

    def raw(self, app: Flask) -> str:
        with app.app_context():
            store = StateManager().store
            assert isinstance(store, CachedStore)
            for state_id in ("p1", "p2", "l1"):
                StateManager().get_state(state_id)  # fill the cache
        cached = _redis_raw(app.config["STATEMANAGER_REDIS_URL"])
        return _sql_raw(app.config["STATEMANAGER_DATABASE_URI"]) + "\n" + cached

    def test_the_cache_holds_ciphertext(self, sm: StateManager, app: Flask) -> None:
        sm.register_state("p1", "patient", patient(ssn=SSN))
        assert sm.get_state("p1")["data"]["ssn"] == SSN
        store = sm.store
        assert isinstance(store, CachedStore)
        cached = store.peek("p1")
        assert cached is not None and cached["data"]["ssn"].startswith("fernet:")
        assert sm.get_state("p1")["data"]["ssn"] == SSN  # a hit, decrypted
        assert store.cache_stats()["hits"] >= 1

    def test_rotation_drops_cached_entries(self, sm: StateManager, app: Flask) -> None:
        sm.register_state("p1", "patient", patient(ssn=SSN))
        sm.get_state("p1")
        store = sm.store
        assert isinstance(store, CachedStore)
        old = store.peek("p1")
        assert old is not None
        result = app.test_cli_runner().invoke(args=["states", "rotate-keys"])
        assert result.exit_code == 0, result.output
        assert store.peek("p1") is None
        sm.get_state("p1")
        new = store.peek("p1")
        assert new is not None and new["data"]["ssn"] != old["data"]["ssn"]


class TestRedisStoreEncryption(PersistentEncryptionContract):
    @pytest.fixture
    def store_config(self, clean_redis: str) -> dict[str, Any]:
        return {"STATEMANAGER_STORE": "redis", "STATEMANAGER_REDIS_URL": clean_redis}

    def raw(self, app: Flask) -> str:
        return _redis_raw(app.config["STATEMANAGER_REDIS_URL"])


def test_a_field_indexed_then_encrypted_leaves_no_plaintext_in_redis(
    tmp_path: Path, clean_redis: str
) -> None:
    """The Redis store drops the index of a field a type now encrypts (it held the
    values in plain text) and never indexes the field again."""
    manager = StateManager()
    manager.register_type("patient", indexes=["data.ssn", "data.ward"])
    app = make_app(tmp_path, STATEMANAGER_STORE="redis", STATEMANAGER_REDIS_URL=clean_redis)
    manager.init_app(app)
    with app.app_context():
        manager.create_all()
        manager.register_state("p1", "patient", patient(ssn=SSN, ward="a"))
    assert SSN in _redis_raw(clean_redis)
    # The next deployment encrypts the field, so no longer indexes it.
    StateManager.reset_instance()
    manager = StateManager()
    manager.register_type("patient", indexes=["data.ward"], encrypted_fields=["data.ssn"])
    later = make_app(
        tmp_path / "later",
        STATEMANAGER_STORE="redis",
        STATEMANAGER_REDIS_URL=clean_redis,
        STATEMANAGER_ENCRYPTION_KEYS=[KEY_A],
    )
    manager.init_app(later)
    with later.app_context():
        manager.create_all()
        _, run, _ = manager.rotate_encryption_keys()
        list(run)
        manager.update_state("p1", patient(ssn="1120-new", ward="b"))
        assert manager.get_state("p1")["data"] == {"ssn": "1120-new", "ward": "b"}
        assert [s["state_id"] for s in manager.search_states("patient", {"data.ward": "b"})] == [
            "p1"
        ]
    raw = _redis_raw(clean_redis)
    assert not [secret for secret in SECRETS if secret in raw]
    assert "index:patient:data.ssn" not in raw


# -- configuration --------------------------------------------------------------------------


def test_missing_keys_fail_at_init_app(tmp_path: Path) -> None:
    manager = StateManager()
    register_types(manager)
    app = make_app(tmp_path, STATEMANAGER_STORE="memory")
    with pytest.raises(ConfigurationError, match="encrypted_fields but STATEMANAGER_ENCRYPTION"):
        manager.init_app(app)
    assert "statemanager" not in app.extensions


@pytest.mark.parametrize(
    "keys",
    ["not-a-key", [b"short"], "x" * 44, 42, [KEY_A.decode(), "nope"]],
)
def test_malformed_keys_fail_at_init_app(tmp_path: Path, keys: Any) -> None:
    app = make_app(tmp_path, STATEMANAGER_STORE="memory", STATEMANAGER_ENCRYPTION_KEYS=keys)
    with pytest.raises(ConfigurationError, match="STATEMANAGER_ENCRYPTION_KEYS"):
        StateManager().init_app(app)


def test_keys_never_appear_in_errors(tmp_path: Path) -> None:
    bad = KEY_A.decode()[:-4] + "!!!!"
    app = make_app(tmp_path, STATEMANAGER_STORE="memory", STATEMANAGER_ENCRYPTION_KEYS=[bad])
    with pytest.raises(ConfigurationError) as caught:
        StateManager().init_app(app)
    assert bad not in str(caught.value) and "key 1" in str(caught.value)


@pytest.mark.parametrize(
    ("fields", "indexes", "match"),
    [
        (["ssn"], (), "dotted path"),
        (["data."], (), "dotted path"),
        (["data.a b"], (), "dotted path"),
        ("data.ssn", (), "list of paths"),
        (["metadata.version"], (), "schema version"),
        (["data.ssn"], ["data.ssn"], "Cannot index 'data.ssn'"),
        (["data.card.number"], ["data.card"], "Cannot index 'data.card'"),
        (["data.card"], ["data.card.number"], "Cannot index"),
        (["data.card.number", "data.card"], (), "'data.card.number' inside 'data.card'"),
        (["data.card", "data.card.number"], (), "list only 'data.card'"),
    ],
)
def test_bad_encrypted_fields_are_configuration_errors(
    fields: Any, indexes: Any, match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        StateManager().register_type("patient", encrypted_fields=fields, indexes=indexes)
    assert "patient" not in StateManager().types


def test_rotate_keys_without_keys_is_a_clear_cli_error(tmp_path: Path) -> None:
    app = make_app(tmp_path, STATEMANAGER_STORE="memory")
    StateManager().init_app(app)
    result = app.test_cli_runner().invoke(args=["states", "rotate-keys"])
    assert result.exit_code != 0 and "STATEMANAGER_ENCRYPTION_KEYS is not set" in result.output
    bad = app.test_cli_runner().invoke(args=["states", "rotate-keys", "--batch-size", "0"])
    assert bad.exit_code != 0 and "batch-size" in bad.output


def test_values_of_any_json_type_round_trip(tmp_path: Path) -> None:
    manager = StateManager()
    manager.register_type("vault", encrypted_fields=["data.a", "data.b", "data.c", "data.d"])
    app = make_app(tmp_path, STATEMANAGER_STORE="memory", STATEMANAGER_ENCRYPTION_KEYS=[KEY_A])
    manager.init_app(app)
    data = {"a": 12.5, "b": {"x": [1, None, True]}, "c": None, "d": "ünïcødé", "e": "plain"}
    with app.app_context():
        manager.register_state("v1", "vault", {"data": data})
        assert manager.get_state("v1")["data"] == data
        stored = manager.store.get("v1")
        assert stored is not None
        assert all(stored["data"][k].startswith("fernet:") for k in "abcd")
        assert stored["data"]["e"] == "plain"


def test_import_refuses_a_file_this_apps_keys_cannot_open(tmp_path: Path) -> None:
    """An export keeps ciphertext: importing it where no key opens it is refused
    up front, naming the line, instead of succeeding and failing every read."""
    manager = StateManager()
    register_types(manager)
    source = make_app(
        tmp_path / "a", STATEMANAGER_DATABASE_URI="memory://", STATEMANAGER_ENCRYPTION_KEYS=[KEY_A]
    )
    manager.init_app(source)
    with source.app_context():
        manager.register_state("p1", "patient", patient(ssn=SSN))
    exported = source.test_cli_runner().invoke(args=["states", "export"])
    assert exported.exit_code == 0, exported.output
    target = make_app(
        tmp_path / "b", STATEMANAGER_DATABASE_URI="memory://", STATEMANAGER_ENCRYPTION_KEYS=[KEY_B]
    )
    manager.init_app(target)
    refused = target.test_cli_runner().invoke(args=["states", "import"], input=exported.stdout)
    assert refused.exit_code != 0
    assert "Line 1" in refused.output and "STATEMANAGER_ENCRYPTION_KEYS" in refused.output
    with target.app_context():
        assert manager.store.get("p1") is None  # nothing was imported
    both = make_app(
        tmp_path / "c",
        STATEMANAGER_DATABASE_URI="memory://",
        STATEMANAGER_ENCRYPTION_KEYS=[KEY_B, KEY_A],
    )
    manager.init_app(both)
    accepted = both.test_cli_runner().invoke(args=["states", "import"], input=exported.stdout)
    assert accepted.exit_code == 0, accepted.output
    with both.app_context():
        assert manager.get_state("p1")["data"]["ssn"] == SSN


def test_a_state_that_cannot_be_expired_does_not_hold_up_the_sweep(tmp_path: Path) -> None:
    """One state whose ciphertext no configured key opens: the others still expire."""
    manager = StateManager()
    manager.register_type("vault", encrypted_fields=["data.pin"])
    app = make_app(tmp_path, STATEMANAGER_STORE="memory", STATEMANAGER_ENCRYPTION_KEYS=[KEY_A])
    manager.init_app(app)
    with app.app_context():
        for state_id in ("a", "bad", "z"):
            manager.register_state(state_id, "vault", {"data": {"pin": "1234"}}, ttl=0.05)
        store = manager.store
        assert isinstance(store, MemoryStore)
        unreadable = Fernet(KEY_B).encrypt(b'"1234"').decode()
        store._states["bad"]["data"]["pin"] = "fernet:" + unreadable  # written with another key
        time.sleep(0.1)
        with pytest.raises(ConfigurationError):
            manager.sweep_expired()
        expired = {i: store.get(i)["status"] for i in ("a", "bad", "z")}  # type: ignore[index]
        assert expired == {"a": "expired", "bad": "pending", "z": "expired"}
