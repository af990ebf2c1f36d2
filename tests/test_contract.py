"""The store contract: every operation, run on the memory, SQLite and PostgreSQL stores.

One test class, subclassed per store; each test gets a fresh app and an empty
store. Assertions are about what a user sees: values, versions, history rows,
error types, and that nothing is written when an operation is refused.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import marshmallow
import orjson
import pytest
from flask import Flask

from flask_statemanager import (
    Change,
    InvalidTransitionError,
    State,
    StateConflictError,
    StateExistsError,
    StateLimitError,
    StateManager,
    StateNotFoundError,
    StateTransition,
    StateType,
    StateValidationError,
    signals,
)
from flask_statemanager.audit import chain_hash
from flask_statemanager.codec import check_document

from .conftest import make_app


def user(**data: Any) -> dict[str, Any]:
    return {"name": "user_account_state", "type": "user", "data": data}


class StoreContract:
    """Behaviour every store must have. Subclasses provide ``store_config``."""

    @pytest.fixture
    def store_config(self, tmp_path: Path) -> dict[str, Any]:
        raise AssertionError("subclasses choose a store")

    @pytest.fixture
    def app(self, tmp_path: Path, store_config: dict[str, Any]) -> Iterator[Flask]:
        app = make_app(tmp_path, **store_config)
        manager = StateManager()
        manager.register_type("user", indexes=["data.status", "data.age"])
        manager.init_app(app)
        with app.app_context():
            manager.create_all()
            manager.store.reset()
        yield app

    @pytest.fixture
    def sm(self, app: Flask) -> Iterator[StateManager]:
        with app.app_context():
            yield StateManager()

    # -- register / get --------------------------------------------------------

    def test_register_and_get(self, sm: StateManager) -> None:
        state = sm.register_state(
            "user_12345", StateType.USER, user(user_id="12345", status="active")
        )
        assert state["state_id"] == "user_12345"
        assert state["type"] == "user"
        assert state["status"] == "pending"
        assert state["version"] == 1 and state["etag"] == "1"
        assert state["data"] == {"user_id": "12345", "status": "active"}
        assert state["metadata"] == {"version": "1.0"}
        assert state["name"] == "user_account_state"
        assert state["created_at"].tzinfo is not None
        assert state["created_at"] == state["updated_at"]
        assert state["expires_at"] is None
        fetched = sm.get_state("user_12345")
        assert fetched == state
        assert dict(fetched) == dict(state)
        assert fetched.version == 1 and fetched.data["user_id"] == "12345"
        assert fetched.to_json()["created_at"].endswith("Z")

    def test_missing_state_reads_as_none(self, sm: StateManager) -> None:
        assert sm.get_state("nobody") is None
        assert sm.get_state_history("nobody") == []

    def test_register_twice_is_refused(self, sm: StateManager) -> None:
        sm.register_state("u1", "user", user(n=1))
        with pytest.raises(StateExistsError):
            sm.register_state("u1", "user", user(n=2))
        assert sm.get_state("u1")["data"] == {"n": 1}
        assert len(sm.get_state_history("u1")) == 1

    def test_enum_and_string_forms_are_equivalent(self, sm: StateManager) -> None:
        sm.register_state("a", "user", user())
        sm.register_state("b", StateType.USER, user())
        sm.transition("a", "activate")
        sm.transition("b", StateTransition.ACTIVATE)
        assert sm.get_state("a")["status"] == sm.get_state("b")["status"] == "active"
        assert sm.get_changes_by_transition("a", StateTransition.ACTIVATE)[0]["version"] == 2
        assert sm.get_changes_by_transition("b", "activate")[0]["version"] == 2

    def test_records_are_copies(self, sm: StateManager) -> None:
        state = sm.register_state("u1", "user", user(tags=["a"]))
        state["data"]["tags"].append("mutated")
        assert sm.get_state("u1")["data"] == {"tags": ["a"]}

    # -- updates and lifecycle ----------------------------------------------------

    def test_seed_lifecycle_create_activate_suspend_resume(self, sm: StateManager) -> None:
        sm.register_state("test_user", StateType.USER, user(status="new"))
        sm.update_state("test_user", user(status="active"), StateTransition.ACTIVATE)
        sm.update_state(
            "test_user", user(status="suspended", reason="payment_failed"), StateTransition.SUSPEND
        )
        final = sm.update_state("test_user", user(status="active"), StateTransition.RESUME)
        assert final["status"] == "active" and final["version"] == 4
        history = sm.get_state_history("test_user")
        assert [c["transition"] for c in history] == ["create", "activate", "suspend", "resume"]
        assert [c["version"] for c in history] == [1, 2, 3, 4]
        assert history[0]["old_data"] is None
        assert history[0]["new_data"] == {"status": "new"}
        assert history[2]["old_data"] == {"status": "active"}
        assert history[2]["new_data"] == {"status": "suspended", "reason": "payment_failed"}
        assert history[2]["metadata"]["from_status"] == "active"
        assert history[2]["metadata"]["to_status"] == "suspended"

    def test_update_replaces_data_and_keeps_status(self, sm: StateManager) -> None:
        sm.register_state("u1", "user", {"data": {"a": 1, "b": 2}, "metadata": {"x": 1}})
        state = sm.update_state("u1", {"data": {"a": 3}}, actor="alice")
        assert state["data"] == {"a": 3}
        assert state["metadata"] == {"version": "1.0", "x": 1}
        assert state["status"] == "pending" and state["version"] == 2
        assert state["updated_at"] >= state["created_at"]
        change = sm.get_recent_changes("u1", limit=1)[0]
        assert change["actor"] == "alice" and change["transition"] == "update"
        renamed = sm.update_state("u1", {"name": "renamed", "metadata": {"version": "2.0"}})
        assert renamed["name"] == "renamed" and renamed["data"] == {"a": 3}
        assert renamed["metadata"] == {"version": "2.0"}

    def test_invalid_transition_writes_nothing(self, sm: StateManager) -> None:
        sm.register_state("u1", "user", user())
        with pytest.raises(InvalidTransitionError) as info:
            sm.transition("u1", "resume")
        assert info.value.status == "pending" and info.value.transition == "resume"
        assert "activate" in info.value.allowed
        with pytest.raises(InvalidTransitionError):
            sm.update_state("u1", user(x=1), "suspend")
        with pytest.raises(InvalidTransitionError):
            sm.transition("u1", "teleport")
        state = sm.get_state("u1")
        assert state["version"] == 1 and state["data"] == {}
        assert len(sm.get_state_history("u1")) == 1

    def test_transition_with_data(self, sm: StateManager) -> None:
        sm.register_state("u1", "user", user(a=1))
        state = sm.transition("u1", "activate", data={"a": 2})
        assert state["status"] == "active" and state["data"] == {"a": 2}
        state = sm.transition("u1", "suspend")
        assert state["status"] == "suspended" and state["data"] == {"a": 2}
        state = sm.transition("u1", "expire")
        assert state["status"] == "expired"
        # An expired state reads as absent, however it expired.
        assert sm.get_state("u1") is None
        assert sm.get_state("u1", include_expired=True)["version"] == 4
        assert sm.search_states("user").total == 0
        with pytest.raises(StateNotFoundError):
            sm.transition("u1", "update")
        assert sm.register_state("u1", "user", user())["version"] == 5

    def test_custom_lifecycle(self, sm: StateManager) -> None:
        sm.register_type(
            "order",
            lifecycle={
                "create": (None, "new"),
                "pay": ("new", "paid"),
                "ship": (["paid"], "shipped"),
                "update": ("*", None),
            },
        )
        state = sm.register_state("o1", "order", {"data": {"items": 2}})
        assert state["status"] == "new"
        with pytest.raises(InvalidTransitionError):
            sm.transition("o1", "ship")
        with pytest.raises(InvalidTransitionError):
            sm.transition("o1", "activate")  # not in this type's table
        assert sm.transition("o1", "pay")["status"] == "paid"
        assert sm.transition("o1", "ship")["status"] == "shipped"
        assert sm.update_state("o1", {"data": {"items": 3}})["status"] == "shipped"
        sm.delete_state("o1")
        assert sm.get_state("o1") is None

    def test_update_type_mismatch_is_refused(self, sm: StateManager) -> None:
        sm.register_state("u1", "user", user())
        with pytest.raises(StateValidationError) as info:
            sm.update_state("u1", {"type": "transaction", "data": {}})
        assert "type" in info.value.messages
        with pytest.raises(StateValidationError):
            sm.register_state("u2", "user", {"type": "feature", "data": {}})
        assert sm.get_state("u2") is None
        assert sm.get_state("u1")["version"] == 1

    def test_update_missing_state(self, sm: StateManager) -> None:
        with pytest.raises(StateNotFoundError):
            sm.update_state("ghost", user())
        with pytest.raises(StateNotFoundError):
            sm.transition("ghost", "activate")
        with pytest.raises(StateNotFoundError):
            sm.delete_state("ghost")

    # -- optimistic concurrency ---------------------------------------------------

    def test_expected_version(self, sm: StateManager) -> None:
        sm.register_state("u1", "user", user(n=0))
        sm.update_state("u1", user(n=1), expected_version=1)
        with pytest.raises(StateConflictError) as info:
            sm.update_state("u1", user(n=99), expected_version=1)
        assert info.value.expected_version == 1 and info.value.actual_version == 2
        with pytest.raises(StateConflictError):
            sm.patch_state("u1", {"n": 99}, expected_version=5)
        with pytest.raises(StateConflictError):
            sm.delete_state("u1", expected_version=1)
        state = sm.get_state("u1")
        assert state["data"] == {"n": 1} and state["version"] == 2
        assert len(sm.get_state_history("u1")) == 2
        # An etag works like a version, quoted or not.
        assert sm.update_state("u1", user(n=2), expected_version='"2"')["version"] == 3
        assert sm.transition("u1", "activate", expected_version="3")["version"] == 4

    def test_atomic_update(self, sm: StateManager) -> None:
        sm.register_state("counter", "user", user(count=0))
        for _ in range(5):
            sm.atomic_update("counter", lambda d: {**d, "count": d["count"] + 1})
        state = sm.get_state("counter")
        assert state["data"]["count"] == 5 and state["version"] == 6

        def mutate_in_place(data: dict[str, Any]) -> dict[str, Any]:
            data["count"] += 10
            return data

        assert sm.atomic_update("counter", mutate_in_place)["data"]["count"] == 15
        with pytest.raises(StateValidationError):
            sm.atomic_update("counter", lambda d: None)  # type: ignore[arg-type,return-value]
        assert sm.get_state("counter")["version"] == 7

    def test_concurrent_threads_never_lose_a_change(self, sm: StateManager, app: Flask) -> None:
        import threading

        sm.register_state("c", "user", user(count=0))
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                with app.app_context():
                    for _ in range(20):
                        sm.atomic_update("c", lambda d: {"count": d["count"] + 1}, retries=100)
                        sm.update_state("c", {"metadata": {"touched": True}})
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        state = sm.get_state("c")
        assert state["data"]["count"] == 80
        history = sm.get_state_history("c")
        assert [c["version"] for c in history] == list(range(1, 162))
        assert state["version"] == 161

    # -- patch, delete, rollback --------------------------------------------------------

    def test_patch_is_a_json_merge_patch(self, sm: StateManager) -> None:
        sm.register_state("u1", "user", user(a=1, nested={"x": 1, "y": 2}, gone=True))
        state = sm.patch_state("u1", {"a": 2, "nested": {"y": None, "z": 3}, "gone": None})
        assert state["data"] == {"a": 2, "nested": {"x": 1, "z": 3}}
        change = sm.get_state_history("u1")[-1]
        assert change["old_data"]["gone"] is True and "gone" not in change["new_data"]

    def test_delete_keeps_history_and_allows_reregistration(self, sm: StateManager) -> None:
        sm.register_state("u1", "user", user(a=1))
        sm.delete_state("u1", actor="admin")
        assert sm.get_state("u1") is None
        assert sm.get_state("u1", include_expired=True) is None
        assert sm.bulk_get(["u1"]) == {}
        assert sm.search_states("user").total == 0
        history = sm.get_state_history("u1")
        assert [c["transition"] for c in history] == ["create", "delete"]
        assert history[-1]["new_data"] is None and history[-1]["actor"] == "admin"
        with pytest.raises(StateNotFoundError):
            sm.update_state("u1", user())
        again = sm.register_state("u1", "user", user(a=2))
        assert again["version"] == 3 and again["status"] == "pending"
        assert [c["version"] for c in sm.get_state_history("u1")] == [1, 2, 3]

    def test_rollback(self, sm: StateManager) -> None:
        sm.register_state("u1", "user", user(v="one"))
        sm.update_state("u1", user(v="two"))
        sm.update_state("u1", user(v="three"))
        state = sm.rollback("u1", 1, actor="ops")
        assert state["data"] == {"v": "one"} and state["version"] == 4
        last = sm.get_state_history("u1")[-1]
        assert last["transition"] == "update" and last["metadata"]["rollback_to"] == 1
        assert last["old_data"] == {"v": "three"} and last["actor"] == "ops"
        with pytest.raises(StateValidationError):
            sm.rollback("u1", 42)
        assert sm.get_state("u1")["version"] == 4

    # -- history queries ---------------------------------------------------------------

    def test_recent_changes_and_by_transition(self, sm: StateManager) -> None:
        sm.register_state("a", "user", user())
        sm.register_state("b", "user", user())
        sm.transition("a", "activate")
        sm.transition("a", "suspend")
        sm.transition("a", "resume")
        sm.transition("a", "suspend")
        recent = sm.get_recent_changes("a", limit=2)
        assert [(c["version"], c["transition"]) for c in recent] == [(5, "suspend"), (4, "resume")]
        everything = sm.get_recent_changes(limit=3)
        assert [(c["state_id"], c["version"]) for c in everything] == [("a", 5), ("a", 4), ("a", 3)]
        suspensions = sm.get_changes_by_transition("a", StateTransition.SUSPEND)
        assert [c["version"] for c in suspensions] == [3, 5]
        assert all(c["change_id"] for c in suspensions)
        assert len({c["change_id"] for c in sm.get_state_history("a")}) == 5
        # A batch's changes are recent in the order it made them, on every store.
        with sm.transaction() as tx:
            tx.register_state("zz", "user", user())
            tx.register_state("aa", "user", user())
            tx.update_state("zz", user(n=1))
        newest = [(c["state_id"], c["version"]) for c in sm.get_recent_changes(limit=3)]
        assert newest == [("zz", 2), ("aa", 1), ("zz", 1)]

    # -- tamper-evident history -----------------------------------------------------------

    def test_numbers_read_back_the_same_on_every_store(self, sm: StateManager) -> None:
        """PostgreSQL's jsonb turns -0.0 into 0.0 and 1e16 into an integer: every
        store writes them that way, so the returned record, a later read, the
        history and an export agree everywhere."""
        data = {"big": 1e16, "huge": 1e20, "negz": -0.0, "tiny": 1.5e-7, "one": 1.0, "n": [2e18]}
        written = sm.register_state("nums", "user", user(**data))
        expected = {
            "big": 10**16, "huge": 1e20, "negz": 0.0, "tiny": 1.5e-7, "one": 1.0, "n": [2 * 10**18]
        }  # fmt: skip
        for record in (written, sm.get_state("nums"), sm.store.primary.get("nums")):
            assert record is not None
            assert record["data"] == expected
            assert {k: type(v) for k, v in record["data"].items()} == {
                k: type(v) for k, v in expected.items()
            }
            assert math.copysign(1.0, record["data"]["negz"]) == 1.0
        assert sm.get_state_history("nums")[0]["new_data"] == expected
        with pytest.raises(StateValidationError, match="store it as a string"):
            sm.update_state("nums", user(big=1e19))  # an integer beyond int64 on PostgreSQL
        assert sm.get_state("nums")["version"] == 1

    def test_every_entry_is_chained_to_the_one_before(self, sm: StateManager) -> None:
        sm.register_state("a", "user", user(n=1.5, neg=-0.0, big=1e20, text="é ☃"))
        sm.transition("a", "activate", data={"n": 2})
        sm.patch_state("a", {"m": [1, {"x": None}]})
        with sm.transaction() as tx:
            tx.update_state("a", user(n=3))
            tx.update_state("a", user(n=4))
            tx.register_state("b", "user", user(n=0))
        sm.delete_state("b")
        sm.register_state("b", "user", user(n=9), ttl=0.05)
        time.sleep(0.1)
        assert sm.get_state("b") is None  # the expiry is recorded on read
        sm.rollback("a", 2)
        for state_id, length in (("a", 6), ("b", 4)):
            history = sm.get_state_history(state_id)
            assert len(history) == length
            previous = ""
            for change in history:  # recomputed here, independently of audit.verify
                body = {k: v for k, v in change.to_json().items() if k != "hash"}
                canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS).replace(
                    b'"neg":-0.0', b'"neg":0.0'
                )
                digest = hashlib.sha256(previous.encode() + b"\n" + canonical).hexdigest()
                assert change["hash"] == change.hash == digest, change
                previous = digest
        assert sorted(sm.verify_history()) == ["a", "b"]
        assert list(sm.verify_history("a")) == ["a"]

    def test_verify_walks_every_state_that_has_history(self, sm: StateManager) -> None:
        ids = [f"s{i:04d}" for i in range(1205)]
        for start in range(0, len(ids), 200):
            outcome = sm.bulk_register(
                [
                    {"state_id": i, "state_type": "user", "initial_data": user(n=n)}
                    for n, i in enumerate(ids[start : start + 200], start)
                ]
            )
            assert outcome.ok
        sm.delete_state("s0003")
        assert list(sm.verify_history()) == ids  # in id order, deleted ones included
        with pytest.raises(StateNotFoundError):
            list(sm.verify_history("nobody"))

    # -- bulk_get ------------------------------------------------------------------------

    def test_bulk_get(self, sm: StateManager) -> None:
        for i in range(5):
            sm.register_state(f"u{i}", "user", user(i=i))
        sm.delete_state("u3")
        found = sm.bulk_get(["u0", "u3", "u4", "missing", "u0"])
        assert sorted(found) == ["u0", "u4"]
        assert found["u4"]["data"] == {"i": 4}
        assert sm.bulk_get([]) == {}
        with pytest.raises(StateValidationError):
            sm.bulk_get(["ok", "bad id"])

    # -- transactions and bulk writes -----------------------------------------------------

    def test_transaction_commits_everything_together(self, sm: StateManager, app: Flask) -> None:
        sm.register_state("a", "user", user(credits=100))
        sm.register_state("b", "user", user(credits=0))
        seen: list[tuple[str, str]] = []

        def on_changed(sender: Any, **kw: Any) -> None:
            # Signals follow the commit: every change is already visible.
            assert sm.get_state("t1") is not None
            seen.append((kw["state_id"], kw["transition"]))

        with signals.state_changed.connected_to(on_changed, sender=app):
            with sm.transaction() as tx:
                tx.atomic_update("a", lambda d: {"credits": d["credits"] - 10})
                tx.patch_state("b", {"credits": 10})
                tx.register_state("t1", "transaction", {"data": {"amount": 10}}, actor="bank")
                tx.transition("a", "activate")
                tx.delete_state("b")
        assert [(s["state_id"], s["version"]) for s in tx.results] == [
            ("a", 2),
            ("b", 2),
            ("t1", 1),
            ("a", 3),
            ("b", 3),
        ]
        assert seen == [
            ("a", "update"),
            ("b", "update"),
            ("t1", "create"),
            ("a", "activate"),
            ("b", "delete"),
        ]
        a = sm.get_state("a")
        assert a["data"] == {"credits": 90} and a["status"] == "active" and a["version"] == 3
        assert sm.get_state("b") is None
        assert [c["version"] for c in sm.get_state_history("a")] == [1, 2, 3]
        assert sm.get_state_history("t1")[0]["actor"] == "bank"

    def test_transaction_with_one_invalid_change_writes_nothing(self, sm: StateManager) -> None:
        sm.register_state("a", "user", user(n=1))
        sm.register_state("b", "user", user(n=1))
        before = {i: sm.get_state_history(i) for i in ("a", "b")}
        failing = [
            (lambda tx: tx.transition("b", "resume"), InvalidTransitionError),
            (lambda tx: tx.update_state("b", user(n=2), expected_version=7), StateConflictError),
            (lambda tx: tx.register_state("a", "user", user()), StateExistsError),
            (lambda tx: tx.update_state("ghost", user()), StateNotFoundError),
            (lambda tx: tx.patch_state("b", {"bad": {1, 2}}), StateValidationError),
        ]
        for add_bad_change, error in failing:
            with pytest.raises(error):
                with sm.transaction() as tx:
                    tx.update_state("a", user(n=2))
                    tx.register_state("c", "user", user())
                    add_bad_change(tx)
            assert sm.get_state("a")["data"] == {"n": 1}
            assert sm.get_state("c") is None
            assert {i: sm.get_state_history(i) for i in ("a", "b")} == before
        with pytest.raises(RuntimeError):
            with sm.transaction() as tx:
                tx.update_state("a", user(n=3))
                raise RuntimeError("changed my mind")
        assert sm.get_state("a")["version"] == 1

    def test_bulk_register_reports_each_item(self, sm: StateManager) -> None:
        sm.register_state("taken", "user", user())
        result = sm.bulk_register(
            [
                {"state_id": "u1", "state_type": "user", "initial_data": user(n=1)},
                {"state_id": "bad id", "state_type": "user", "initial_data": user()},
                {"state_id": "taken", "state_type": "user", "initial_data": user()},
                {"state_id": "u2", "state_type": "user", "initial_data": user(n=2), "ttl": 60},
                {"state_id": "u3", "state_type": "nosuchtype", "initial_data": user()},
                {"state_id": "u4", "state_type": "user"},
                {"state_id": "u5", "state_type": "user", "initial_data": {"data": {"x": {1}}}},
            ]
        )
        assert not result.ok and len(result) == 7
        assert sorted(result.states) == ["u1", "u2"]
        assert result.states["u2"]["expires_at"] is not None
        assert {k: type(v).__name__ for k, v in result.errors.items()} == {
            "bad id": "StateValidationError",
            "taken": "StateExistsError",
            "u3": "StateValidationError",
            "u4": "StateValidationError",
            "u5": "StateValidationError",
        }
        assert sm.get_state("u1")["data"] == {"n": 1}
        assert len(sm.get_state_history("taken")) == 1
        many = sm.bulk_register(
            [
                {"state_id": f"m{i}", "state_type": "user", "initial_data": user(i=i)}
                for i in range(300)
            ]
        )
        assert many.ok and len(many.states) == 300
        assert sm.search_states("user", {"data.i__gte": 0}).total == 300

    def test_bulk_update_reports_each_item(self, sm: StateManager) -> None:
        for i in range(3):
            sm.register_state(f"u{i}", "user", user(i=i))
        result = sm.bulk_update(
            [
                {"state_id": "u0", "new_data": user(i=10)},
                {"state_id": "u1", "new_data": user(i=11), "expected_version": 5},
                {"state_id": "u2", "new_data": user(i=12), "transition": "activate"},
                {"state_id": "ghost", "new_data": user()},
                {"state_id": "u0", "new_data": user(i=20)},
            ]
        )
        assert [type(o).__name__ for o in result] == [
            "State",
            "StateConflictError",
            "State",
            "StateNotFoundError",
            "State",
        ]
        assert [o["version"] for o in result if not isinstance(o, Exception)] == [2, 2, 3]
        assert sm.get_state("u0")["data"] == {"i": 20}
        assert sm.get_state("u1")["version"] == 1
        assert sm.get_state("u2")["status"] == "active"
        with pytest.raises(StateValidationError):
            sm.bulk_update({"u0": user()})  # type: ignore[arg-type]

    # -- search --------------------------------------------------------------------------

    def _people(self, sm: StateManager) -> None:
        people = [
            ("p1", {"status": "active", "age": 30, "tags": ["a", "b"], "city": "Harare"}),
            ("p2", {"status": "active", "age": 17, "tags": ["b"], "vip": True}),
            ("p3", {"status": "suspended", "age": 45, "vip": False}),
            ("p4", {"status": "active", "age": 30.5, "city": "Bulawayo", "nick": None}),
            ("p5", {"status": "pending", "age": "unknown", "addr": {"city": "Harare"}}),
        ]
        for state_id, data in people:
            sm.register_state(state_id, "user", {"data": data, "metadata": {"tier": state_id}})
        sm.register_state("f1", "feature", {"data": {"status": "active"}})

    def _ids(self, page: Any) -> list[str]:
        return sorted(s["state_id"] for s in page)

    def test_search_operators(self, sm: StateManager) -> None:
        self._people(sm)
        search = sm.search_states
        assert self._ids(search("user", {"data.status": "active"})) == ["p1", "p2", "p4"]
        assert self._ids(search(None, {"data.status": "active"})) == ["f1", "p1", "p2", "p4"]
        assert self._ids(search("user", {"data.status__ne": "active"})) == ["p3", "p5"]
        assert self._ids(search("user", {"data.age__gt": 30})) == ["p3", "p4"]
        assert self._ids(search("user", {"data.age__gte": 30})) == ["p1", "p3", "p4"]
        assert self._ids(search("user", {"data.age__lt": 30})) == ["p2"]
        assert self._ids(search("user", {"data.age__lte": 30})) == ["p1", "p2"]
        assert self._ids(search("user", {"data.age": 30})) == ["p1"]
        assert self._ids(search("user", {"data.age__in": [17, 45]})) == ["p2", "p3"]
        assert self._ids(search("user", {"data.status__in": ["pending", "suspended"]})) == [
            "p3",
            "p5",
        ]
        assert self._ids(search("user", {"data.tags__contains": "b"})) == ["p1", "p2"]
        assert self._ids(search("user", {"data.city__contains": "arar"})) == ["p1"]
        assert self._ids(search("user", {"data.vip": True})) == ["p2"]
        assert self._ids(search("user", {"data.vip": False})) == ["p3"]
        assert self._ids(search("user", {"data.nick": None})) == ["p4"]
        assert self._ids(search("user", {"data.vip__exists": True})) == ["p2", "p3"]
        assert self._ids(search("user", {"data.nick__exists": True})) == ["p4"]
        assert self._ids(search("user", {"data.city__exists": False})) == ["p2", "p3", "p5"]
        assert self._ids(search("user", {"data.addr.city": "Harare"})) == ["p5"]
        assert self._ids(search("user", {"data.age__gt": "a"})) == ["p5"]
        assert self._ids(search("user", {"metadata.tier": "p2"})) == ["p2"]
        assert self._ids(search("user", {"status": "pending", "data.age__lt": 40})) == [
            "p1",
            "p2",
            "p4",
        ]
        assert self._ids(search("user", {"name__contains": "p"})) == ["p1", "p2", "p3", "p4", "p5"]
        assert self._ids(search(None, {"type": "feature"})) == ["f1"]
        assert self._ids(search("user", {"state_id__in": ["p1", "p9"]})) == ["p1"]
        assert self._ids(search("user", {"version__gte": 2})) == []

    def test_search_paths_walk_objects_and_take_any_key(self, sm: StateManager) -> None:
        """An all-digit segment names an object key, never an array index, and a
        key spelled NULL is a key like any other."""
        docs = {
            "k1": {"tags": ["x", "y"], "items": [5, 6]},
            "k2": {"tags": {"0": "x"}, "items": {"1": 7}},
            "k3": {"NULL": 1},
            "k4": {"null": None, "NULL": 2},
        }
        for state_id, data in docs.items():
            sm.register_state(state_id, "user", {"data": data})
        search = sm.search_states
        assert self._ids(search("user", {"data.tags.0": "x"})) == ["k2"]
        assert self._ids(search("user", {"data.tags.0__in": ["x", "y"]})) == ["k2"]
        assert self._ids(search("user", {"data.tags.0__contains": "x"})) == ["k2"]
        assert self._ids(search("user", {"data.tags.0__exists": True})) == ["k2"]
        assert self._ids(search("user", {"data.tags.0__exists": False})) == ["k1", "k3", "k4"]
        assert self._ids(search("user", {"data.tags.0__ne": "x"})) == ["k1", "k3", "k4"]
        assert self._ids(search("user", {"data.items.1__gt": 5})) == ["k2"]
        assert self._ids(search("user", {"data.NULL": 1})) == ["k3"]
        assert self._ids(search("user", {"data.NULL__gte": 1})) == ["k3", "k4"]
        assert self._ids(search("user", {"data.NULL__ne": 1})) == ["k1", "k2", "k4"]
        assert self._ids(search("user", {"data.null__exists": True})) == ["k4"]
        assert self._ids(search("user", {"data.null": None})) == ["k4"]

    def test_search_on_record_columns(self, sm: StateManager) -> None:
        """``__ne`` keeps rows whose column is empty (no TTL); ``__contains`` is a
        case-sensitive substring, refused on columns that are not text."""
        sm.register_state("c1", "user", {"name": "Alpha", "data": {}}, ttl=3600)
        sm.register_state("c2", "user", {"name": "alpha", "data": {}})
        search = sm.search_states
        instant = datetime(2000, 1, 1, tzinfo=UTC)
        assert self._ids(search("user", {"expires_at__ne": instant})) == ["c1", "c2"]
        assert self._ids(search("user", {"expires_at__gt": instant})) == ["c1"]
        assert self._ids(search("user", {"name__contains": "A"})) == ["c1"]
        assert self._ids(search("user", {"name__contains": "a"})) == ["c1", "c2"]
        assert self._ids(search("user", {"name__contains": "LPH"})) == []
        assert self._ids(search("user", {"name__contains": "%"})) == []
        assert self._ids(search("user", {"state_id__contains": "2"})) == ["c2"]
        for field, value in [
            ("version__contains", 1),
            ("created_at__contains", instant),
            ("updated_at__contains", instant),
            ("expires_at__contains", instant),
        ]:
            with pytest.raises(StateValidationError) as info:
                search("user", {field: value})
            assert "__contains applies to" in str(info.value)

    def test_search_paging_and_order(self, sm: StateManager) -> None:
        for i in range(7):
            sm.register_state(f"s{i}", "user", user(i=i))
        sm.update_state("s2", user(i=2))
        first = sm.search_states("user", page=1, per_page=3)
        assert first.total == 7 and first.pages == 3
        assert first.has_next and not first.has_prev
        assert first.items[0]["state_id"] == "s2"  # most recently updated first
        last = sm.search_states("user", page=3, per_page=3)
        assert len(last) == 1 and last.has_prev and not last.has_next
        by_id = sm.search_states("user", order_by="state_id", per_page=50)
        assert [s["state_id"] for s in by_id] == [f"s{i}" for i in range(7)]
        desc = sm.search_states("user", order_by="-state_id", per_page=2, page=2)
        assert [s["state_id"] for s in desc] == ["s4", "s3"]
        seen = [
            s["state_id"]
            for p in (1, 2, 3)
            for s in sm.get_states_by_type("user", page=p, per_page=3)
        ]
        assert sorted(seen) == [f"s{i}" for i in range(7)]
        assert sm.search_states("user", page=9).items == []

    @pytest.mark.parametrize(
        "filters",
        [
            {"data.status; DROP TABLE x": 1},
            {"data.": 1},
            {"data..a": 1},
            {"data.a b": 1},
            {"password": 1},
            {"data.a__regex": "x"},
            {"data.a__in": "not-a-list"},
            {"data.a__in": []},
            {"data.a__exists": "yes"},
            {"data.a__gt": None},
            {"data.a__gt": True},
            {"data.a": {"nested": 1}},
            {"data.a": float("nan")},
            {"version": "2"},
            {"status": 3},
            {"created_at__gt": "yesterday"},
            {"status__exists": True},
            {"data.a": "nul\x00"},
            {"data.a": "\ud800"},
            {"data.a__gt": 10**23},
            {"name": "\x00"},
        ],
    )
    def test_bad_filters_are_typed_errors(self, sm: StateManager, filters: Any) -> None:
        with pytest.raises(StateValidationError) as info:
            sm.search_states("user", filters)
        assert info.value.messages

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"per_page": 0},
            {"page": 10**23},
            {"per_page": 10_000},
            {"page": 0},
            {"per_page": "5"},
            {"order_by": "data.status"},
            {"order_by": "-password"},
        ],
    )
    def test_bad_paging_is_a_typed_error(self, sm: StateManager, kwargs: Any) -> None:
        with pytest.raises(StateValidationError):
            sm.search_states("user", **kwargs)

    def test_search_unknown_type(self, sm: StateManager) -> None:
        with pytest.raises(StateValidationError):
            sm.search_states("nosuchtype")

    # -- bad input writes nothing ---------------------------------------------------------

    @pytest.mark.parametrize(
        "state_id",
        ["", "has space", "slash/id", "x" * 256, "tab\t", "ünicode", None, 5, "new\nline"],
    )
    def test_bad_ids(self, sm: StateManager, state_id: Any) -> None:
        with pytest.raises(StateValidationError) as info:
            sm.register_state(state_id, "user", user())
        assert "state_id" in info.value.messages
        with pytest.raises(StateValidationError):
            sm.get_state(state_id)
        assert sm.search_states("user").total == 0

    def test_longest_and_punctuated_ids_are_fine(self, sm: StateManager) -> None:
        for state_id in ["x" * 255, "a.b:c@d-e_f", "0"]:
            sm.register_state(state_id, "user", user())
            assert sm.get_state(state_id)["state_id"] == state_id

    @pytest.mark.parametrize(
        "data",
        [
            {"s": {1, 2}},
            {"b": b"bytes"},
            {"f": float("nan")},
            {"f": float("inf")},
            {"d": datetime.now(UTC)},
            {1: "int key"},
            {"big": 2**70},
            {"o": object()},
            {"lone_surrogate": "\ud800"},
            {"nul": "a\x00b"},
            {"nul\x00key": 1},
            {"\udfff": "surrogate key"},
        ],
    )
    def test_non_json_data_is_refused(self, sm: StateManager, data: Any) -> None:
        with pytest.raises(StateValidationError) as info:
            sm.register_state("u1", "user", {"data": data})
        assert "data" in info.value.messages
        assert sm.get_state("u1") is None
        sm.register_state("u2", "user", user(ok=True))
        with pytest.raises(StateValidationError):
            sm.update_state("u2", {"data": data})
        with pytest.raises(StateValidationError):
            sm.patch_state("u2", data)
        assert sm.get_state("u2")["version"] == 1

    @pytest.mark.parametrize(
        "payload",
        [
            ["not", "a", "dict"],
            {"data": [1, 2]},
            {"data": {}, "extra": 1},
            {"user_id": "12345"},
            {"data": {}, "metadata": "v1"},
            {"name": "", "data": {}},
        ],
    )
    def test_malformed_payloads(self, sm: StateManager, payload: Any) -> None:
        with pytest.raises(StateValidationError):
            sm.register_state("u1", "user", payload)
        assert sm.get_state("u1") is None

    def test_size_and_depth_limits(self, sm: StateManager, app: Flask) -> None:
        app.config["STATEMANAGER_MAX_STATE_BYTES"] = 1000
        app.config["STATEMANAGER_MAX_DEPTH"] = 4
        StateManager().init_app(app)  # re-init picks up the new limits
        sm.store.reset()
        with pytest.raises(StateLimitError) as info:
            sm.register_state("big", "user", user(blob="x" * 2000))
        assert info.value.limit == "size" and info.value.maximum == 1000
        deep: dict[str, Any] = {"leaf": 1}
        for _ in range(5):
            deep = {"n": deep}
        with pytest.raises(StateLimitError) as depth:
            sm.register_state("deep", "user", {"data": deep})
        assert depth.value.limit == "depth"
        assert sm.search_states("user").total == 0

    @pytest.mark.parametrize("text", ["\ud800", "a\x00b", "", "x" * 256])
    def test_bad_names_and_actors(self, sm: StateManager, text: str) -> None:
        with pytest.raises(StateValidationError) as info:
            sm.register_state("u1", "user", {"name": text, "data": {}})
        assert "name" in info.value.messages
        with pytest.raises(StateValidationError) as info:
            sm.register_state("u1", "user", user(), actor=text)
        assert "actor" in info.value.messages
        assert sm.get_state("u1") is None

    def test_unicode_is_stored_exactly(self, sm: StateManager) -> None:
        text = "Zimbabwe 🇿🇼 — ñ ü 漢字 \u2028"
        sm.register_state("u1", "user", {"name": text, "data": {text: [text]}}, actor=text)
        state = sm.get_state("u1")
        assert state["name"] == text and state["data"] == {text: [text]}
        assert sm.get_state_history("u1")[0]["actor"] == text
        assert [s["state_id"] for s in sm.search_states("user", {"name": text})] == ["u1"]

    def test_unknown_type_and_bad_arguments(self, sm: StateManager) -> None:
        with pytest.raises(StateValidationError):
            sm.register_state("u1", "no_such_type", user())
        with pytest.raises(StateValidationError):
            sm.register_state("u1", "Bad Type!", user())
        for bad_ttl in (0, -5, "10", True):
            with pytest.raises(StateValidationError):
                sm.register_state("u1", "user", user(), ttl=bad_ttl)
        sm.register_state("u1", "user", user())
        for bad_version in (0, -1, "abc", 1.5, "²", "١"):  # not ASCII digits, either
            with pytest.raises(StateValidationError):
                sm.update_state("u1", user(), expected_version=bad_version)
        with pytest.raises(StateValidationError):
            sm.register_state("u2", "user", user(), actor="x" * 300)
        # Payloads of the wrong shape, and ids that are not a list.
        with pytest.raises(StateValidationError, match=r"unknown keys \[1\]"):
            sm.update_state("u1", {1: 2})  # type: ignore[dict-item]
        for data in (5, "ab"):
            with pytest.raises(StateValidationError, match="data must be a dict"):
                sm.transition("u1", "activate", data=data)  # type: ignore[arg-type]
        for ids in (None, 5):
            with pytest.raises(StateValidationError, match="bulk_get takes a list of ids"):
                sm.bulk_get(ids)  # type: ignore[arg-type]
        with pytest.raises(StateValidationError):
            sm.register_type("cart\n")  # "$" would let the newline through
        outcome = sm.bulk_update(
            [
                {"state_id": "u1", "new_data": user(n=1), "expected_version": "²"},
                {"state_id": "u1", "new_data": user(n=2)},
            ]
        )
        assert isinstance(outcome.outcomes[0], StateValidationError)
        assert sm.get_state("u1")["version"] == 2  # the good item was applied
        assert sm.get_state("u2") is None

    # -- validators ---------------------------------------------------------------------------

    def test_callable_validator(self, sm: StateManager) -> None:
        def has_email(state: dict[str, Any]) -> bool:
            return "email" in state.get("data", {})

        sm.register_validator(StateType.USER, has_email)
        with pytest.raises(StateValidationError) as info:
            sm.register_state("u1", "user", user(name="x"))
        assert "has_email" in str(info.value)
        assert sm.get_state("u1") is None
        sm.register_state("u1", "user", user(email="a@b.c"))
        with pytest.raises(StateValidationError):
            sm.update_state("u1", user(name="no email"))
        # Transitions that do not change data do not re-run data validators.
        assert sm.transition("u1", "activate")["version"] == 2

    def test_marshmallow_schema_validator(self, sm: StateManager) -> None:
        class UserData(marshmallow.Schema):
            email = marshmallow.fields.Email(required=True)
            age = marshmallow.fields.Integer(validate=marshmallow.validate.Range(min=0))

        sm.register_validator("user", UserData)
        with pytest.raises(StateValidationError) as info:
            sm.register_state("u1", "user", user(email="nope", age=-1))
        assert set(info.value.messages["data"]) == {"email", "age"}
        sm.register_state("u1", "user", user(email="a@example.com", age=3))
        sm.register_type("cart", schema=UserData())
        with pytest.raises(StateValidationError):
            sm.register_state("c1", "cart", {"data": {}})
        sm.register_type("cart")  # redefined without a schema: no longer checked
        assert sm.register_state("c1", "cart", {"data": {}})["version"] == 1

    def test_validator_raising_validation_error(self, sm: StateManager) -> None:
        def strict(state: dict[str, Any]) -> bool:
            if state["data"].get("credits", 0) < 0:
                raise StateValidationError("credits below zero", {"credits": ["Negative."]})
            return True

        sm.register_validator("user", strict)
        sm.register_state("u1", "user", user(credits=5))
        with pytest.raises(StateValidationError) as info:
            sm.patch_state("u1", {"credits": -1})
        assert info.value.messages == {"credits": ["Negative."]}
        assert sm.get_state("u1")["data"] == {"credits": 5}

    def test_transition_guard(self, sm: StateManager) -> None:
        def verified_to_activate(state: dict[str, Any], transition: str) -> bool:
            return transition != "activate" or state["data"].get("verified") is True

        sm.register_validator("user", verified_to_activate)
        sm.register_state("u1", "user", user(verified=False))
        with pytest.raises(StateValidationError):
            sm.transition("u1", "activate")
        assert sm.get_state("u1")["status"] == "pending"
        assert sm.transition("u1", "activate", data={"verified": True})["status"] == "active"

        calls: list[str] = []
        sm.register_validator("user", lambda s, t: calls.append(t) or True, transitions=["suspend"])
        sm.transition("u1", "suspend")
        sm.transition("u1", "resume")
        assert calls == ["suspend"]

    # -- signals and callbacks ------------------------------------------------------------------

    def test_listeners_get_copies_of_the_records(self, sm: StateManager) -> None:
        def meddle(sender: Any, **kw: Any) -> None:
            kw["new_state"]["data"]["meddled"] = True
            kw["change"]["new_data"]["meddled"] = True

        def meddle_too(state_id: str, old: Any, new: Any, transition: str) -> None:
            new["data"]["tags"].append("meddled")

        sm.register_callback("user_*", meddle_too)
        with signals.state_changed.connected_to(meddle):
            written = sm.register_state("u1", "user", user(tags=["a"]))
        assert written["data"] == {"tags": ["a"]}  # the caller's record is untouched
        assert written == sm.get_state("u1")
        assert sm.get_state_history("u1")[0]["new_data"] == {"tags": ["a"]}

    def test_signals_after_commit(self, sm: StateManager, app: Flask) -> None:
        received: list[tuple[str, dict[str, Any]]] = []

        def on_changed(sender: Any, **kw: Any) -> None:
            # Receivers see committed data.
            assert sm.get_state(kw["state_id"]) == kw["new_state"] or kw["transition"] == "delete"
            received.append(("changed", kw))

        def on_suspended(sender: Any, **kw: Any) -> None:
            received.append(("suspended", kw))

        with (
            signals.state_changed.connected_to(on_changed, sender=app),
            signals.state_suspended.connected_to(on_suspended, sender=app),
        ):
            sm.register_state("u1", "user", user())
            sm.transition("u1", "activate")
            sm.transition("u1", "suspend", actor="bot")
            sm.delete_state("u1")
        kinds = [(k, kw["transition"]) for k, kw in received]
        assert kinds == [
            ("changed", "create"),
            ("changed", "activate"),
            ("changed", "suspend"),
            ("suspended", "suspend"),
            ("changed", "delete"),
        ]
        create = received[0][1]
        assert create["old_state"] is None and create["state_type"] == "user"
        suspend = received[3][1]
        assert suspend["old_state"]["status"] == "active"
        assert suspend["new_state"]["status"] == "suspended"
        assert suspend["change"]["actor"] == "bot" and suspend["change"]["version"] == 3
        assert received[-1][1]["new_state"]["status"] == "deleted"

    def test_failing_receiver_never_undoes_the_change(self, sm: StateManager, app: Flask) -> None:
        def boom(sender: Any, **kw: Any) -> None:
            raise RuntimeError("receiver bug")

        with signals.state_created.connected_to(boom, sender=app):
            state = sm.register_state("u1", "user", user())
        assert state["version"] == 1 and sm.get_state("u1") is not None
        assert sm.get_metrics()["signal_errors"] == 1

    def test_callbacks_by_pattern(self, sm: StateManager) -> None:
        calls: list[tuple[str, str, Any, Any]] = []

        def record(tag: str) -> Any:
            def fn(state_id: str, old: Any, new: Any, transition_type: str) -> None:
                calls.append((tag, transition_type, old and old["status"], new["status"]))

            return fn

        sm.register_callback("user_suspended", record("exact"))
        sm.register_callback("user_*", record("user"))
        sm.register_callback("*", record("all"))
        sm.register_callback("*_created", record("created"))
        sm.register_state("u1", "user", user())
        sm.transition("u1", "activate")
        sm.transition("u1", "suspend")
        sm.register_state("f1", "feature", {"data": {}})
        assert ("exact", "suspend", "active", "suspended") in calls
        assert [c for c in calls if c[0] == "exact"] == [
            ("exact", "suspend", "active", "suspended")
        ]
        assert [c[1] for c in calls if c[0] == "user"] == ["create", "activate", "suspend"]
        assert [c[1] for c in calls if c[0] == "all"] == ["create", "activate", "suspend", "create"]
        assert [c[1] for c in calls if c[0] == "created"] == ["create", "create"]
        assert ("created", "create", None, "pending") in calls

    def test_failing_callback_is_retried_counted_and_harmless(
        self, sm: StateManager, app: Flask, caplog: pytest.LogCaptureFixture
    ) -> None:
        app.config["STATEMANAGER_CALLBACK_RETRIES"] = 2
        attempts: list[int] = []

        def flaky(state_id: str, old: Any, new: Any, transition_type: str) -> None:
            attempts.append(new["version"])
            raise ConnectionError("notification service down")

        sm.register_callback("user_created", flaky)
        StateManager().init_app(app)
        sm.store.reset()
        state = sm.register_state("u1", "user", user())
        assert state["version"] == 1
        assert sm.get_state("u1")["version"] == 1
        assert attempts == [1, 1, 1]
        metrics = sm.get_metrics()
        assert metrics["callback_failures"] == 1 and metrics["callback_errors"] == 3
        assert "notification service down" in caplog.text

    def test_thread_callbacks(self, sm: StateManager, app: Flask) -> None:
        import threading

        app.config["STATEMANAGER_CALLBACK_MODE"] = "thread"
        StateManager().init_app(app)
        sm.store.reset()
        done = threading.Event()
        seen: list[str] = []

        def cb(state_id: str, old: Any, new: Any, transition_type: str) -> None:
            from flask import current_app

            seen.append(f"{current_app.name}:{state_id}:{threading.current_thread().name}")
            done.set()

        sm.register_callback("user_created", cb)
        sm.register_state("u1", "user", user())
        assert done.wait(5)
        assert seen[0].startswith(f"{app.name}:u1:statemanager-callback")

    # -- TTL --------------------------------------------------------------------------------------

    def test_ttl_expiry_on_read(self, sm: StateManager) -> None:
        state = sm.register_state("s1", "session", {"data": {"token": "t"}}, ttl=0.3)
        assert state["expires_at"] is not None
        assert state["expires_at"] - state["created_at"] == timedelta(seconds=0.3)
        sm.register_state("s2", "session", {"data": {}}, ttl=60)
        assert sm.get_state("s1") is not None
        time.sleep(0.4)
        assert sm.search_states("session").total == 1
        assert sm.bulk_get(["s1", "s2"]).keys() == {"s2"}
        assert sm.get_state("s1") is None
        expired = sm.get_state("s1", include_expired=True)
        assert expired["status"] == "expired" and expired["version"] == 2
        history = sm.get_state_history("s1")
        assert [(c["transition"], c["actor"]) for c in history] == [
            ("create", None),
            ("expire", "ttl"),
        ]
        assert sm.get_state("s1") is None
        assert len(sm.get_state_history("s1")) == 2  # recorded once
        with pytest.raises(StateNotFoundError):
            sm.update_state("s1", {"data": {}})
        renewed = sm.register_state("s1", "session", {"data": {"token": "new"}})
        assert renewed["version"] == 3 and renewed["expires_at"] is None

    def test_default_ttl_and_sweep(self, sm: StateManager) -> None:
        sm.register_type("cart", default_ttl=0.2)
        sm.register_state("c1", "cart", {"data": {}})
        sm.register_state("c2", "cart", {"data": {}}, ttl=60)
        sm.register_state("c3", "cart", {"data": {}})
        time.sleep(0.3)
        assert sm.sweep_expired() == 2
        assert sm.sweep_expired() == 0
        for state_id in ("c1", "c3"):
            assert [c["transition"] for c in sm.get_state_history(state_id)] == ["create", "expire"]
        assert sm.get_state("c2") is not None

    def test_concurrent_sweepers_record_each_expiry_once(
        self, sm: StateManager, app: Flask
    ) -> None:
        import threading

        for i in range(40):
            sm.register_state(f"s{i}", "session", {"data": {}}, ttl=0.2)
        time.sleep(0.3)
        counts: list[int] = []

        def sweeper() -> None:
            with app.app_context():
                counts.append(sm.sweep_expired(limit=100))

        threads = [threading.Thread(target=sweeper) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(counts) == 40
        for i in range(40):
            assert [c["transition"] for c in sm.get_state_history(f"s{i}")] == ["create", "expire"]

    def test_background_sweeper(self, sm: StateManager, app: Flask) -> None:
        app.config["STATEMANAGER_SWEEP_INTERVAL"] = 0.1
        StateManager().init_app(app)
        sm.store.reset()
        expired: list[str] = []
        sm.register_callback("session_expired", lambda sid, old, new, t: expired.append(sid))
        sm.register_state("s1", "session", {"data": {}}, ttl=0.1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not expired:
            time.sleep(0.05)
        # Recorded by the sweeper thread, not by a read (history reads never expire).
        assert expired == ["s1"]
        assert [(c["transition"], c["actor"]) for c in sm.get_state_history("s1")] == [
            ("create", None),
            ("expire", "ttl"),
        ]

    def test_reregister_over_unswept_expired_state_records_expiry(self, sm: StateManager) -> None:
        sm.register_state("s1", "session", {"data": {"n": 1}}, ttl=0.1)
        time.sleep(0.2)
        state = sm.register_state("s1", "session", {"data": {"n": 2}})
        assert state["version"] == 3
        assert [(c["version"], c["transition"]) for c in sm.get_state_history("s1")] == [
            (1, "create"),
            (2, "expire"),
            (3, "create"),
        ]

    def test_update_sets_new_ttl(self, sm: StateManager) -> None:
        sm.register_state("s1", "session", {"data": {}}, ttl=60)
        state = sm.update_state("s1", {"data": {"x": 1}}, ttl=3600)
        assert state["expires_at"] - state["updated_at"] == timedelta(seconds=3600)
        kept = sm.update_state("s1", {"data": {"x": 2}})
        assert kept["expires_at"] == state["expires_at"]

    # -- restore and scan (flask states export / import) -------------------------------------

    def _snapshot(self, sm: StateManager, state_id: str) -> tuple[State, list[Change]]:
        state = sm.store.get(state_id)
        assert state is not None
        return state, sm.store.history(state_id)

    def test_restore_writes_state_and_history_as_given(self, sm: StateManager) -> None:
        sm.register_state("u1", "user", user(status="active", age=30), ttl=3600, actor="ann")
        sm.transition("u1", "activate", actor="bob")
        sm.update_state("u1", {"data": {"status": "gone", "age": 31}})
        state, history = self._snapshot(sm, "u1")
        # A key a later version may add is kept too, where the store can keep it.
        history[1]["x_future"] = "abc123"
        sm.store.reset()
        if sm.store.kind == "sql":
            with pytest.raises(StateValidationError, match="no column for 'x_future'"):
                sm.store.restore(state, history)
            assert sm.store.get("u1") is None and sm.store.history("u1") == []
            del history[1]["x_future"]
        sm.store.restore(state, history)
        assert sm.store.get("u1") == state
        assert sm.store.history("u1") == history
        assert [c["change_id"] for c in sm.get_recent_changes("u1", limit=5)] == [
            c["change_id"] for c in reversed(history)
        ]
        # The restored state is indexed and goes on from its version.
        assert [s["state_id"] for s in sm.search_states("user", {"data.status": "gone"})] == ["u1"]
        assert sm.get_state("u1") == state
        moved = sm.transition("u1", "suspend")
        assert moved["version"] == 4
        assert [c["version"] for c in sm.get_state_history("u1")] == [1, 2, 3, 4]

    def test_restore_keeps_microsecond_timestamps(self, sm: StateManager) -> None:
        when = datetime(2021, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
        state = State.from_columns(
            "u9", "nine", "user", "active", {"status": "x"}, {"version": "1.0"}, 1,
            when, when, datetime(2999, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        )  # fmt: skip
        change = Change(
            change_id="c-9", state_id="u9", version=1, transition="create", old_data=None,
            new_data={"status": "x"}, actor=None, metadata={"to_status": "active"},
            created_at=when,
        )  # fmt: skip
        change["hash"] = chain_hash(None, change)
        sm.store.restore(state, [change])
        assert list(sm.verify_history("u9")) == ["u9"]
        assert sm.store.get("u9") == state
        assert sm.store.history("u9") == [change]

    def test_restore_refuses_a_stored_id_unless_replacing(self, sm: StateManager) -> None:
        sm.register_state("u1", "user", user(status="old"))
        sm.register_state("u2", "user", user(status="new"))
        sm.transition("u2", "activate")
        assert sm.get_state("u1") is not None  # a cache in front now holds u1
        before = self._snapshot(sm, "u1")
        new_state, new_history = self._snapshot(sm, "u2")
        new_state = State(new_state, state_id="u1")
        new_history = [Change(c, state_id="u1") for c in new_history]
        with pytest.raises(StateExistsError, match="replace"):
            sm.store.restore(new_state, new_history)
        assert self._snapshot(sm, "u1") == before
        sm.store.restore(new_state, new_history, replace=True)
        assert sm.get_state("u1") == new_state
        assert sm.get_state_history("u1") == new_history
        assert sm.search_states("user", {"data.status": "old"}).total == 0
        found = sm.search_states("user", {"data.status": "new"})
        assert sorted(s["state_id"] for s in found) == ["u1", "u2"]
        # Replacing with a lower version (a restore may go back in time).
        old_state, old_history = before
        sm.store.restore(old_state, old_history, replace=True)
        assert sm.get_state("u1") == old_state
        assert sm.get_state_history("u1") == old_history

    def test_restore_refuses_a_history_that_does_not_fit(self, sm: StateManager) -> None:
        sm.register_state("u1", "user", user(status="a"))
        sm.update_state("u1", {"data": {"status": "b"}})
        state, history = self._snapshot(sm, "u1")
        sm.store.reset()
        cases = [
            (history[:1], "last history entry is version 1"),
            ([history[1], history[0]], "not above the previous one"),
            ([history[0], Change(history[1], state_id="u2")], "belongs to state 'u2'"),
            ([history[0], Change(history[1], change_id=history[0]["change_id"])], "repeats"),
        ]
        for changes, message in cases:
            with pytest.raises(StateValidationError, match=message):
                sm.store.restore(state, changes)
            assert sm.store.get("u1") is None and sm.store.history("u1") == []

    def test_restore_a_tombstone(self, sm: StateManager) -> None:
        sm.register_state("u1", "user", user(status="a"))
        sm.delete_state("u1")
        state, history = self._snapshot(sm, "u1")
        sm.store.reset()
        sm.store.restore(state, history)
        assert sm.get_state("u1") is None
        assert sm.store.get("u1") == state
        assert sm.store.count() == 0
        assert sm.search_states("user").total == 0
        again = sm.register_state("u1", "user", user(status="b"))
        assert again["version"] == 3

    def test_restored_ttl_is_swept(self, sm: StateManager) -> None:
        sm.register_state("s1", "session", {"data": {}}, ttl=0.1)
        state, history = self._snapshot(sm, "s1")
        sm.store.reset()
        sm.store.restore(state, history)
        time.sleep(0.2)
        assert sm.sweep_expired() == 1
        assert [c["transition"] for c in sm.get_state_history("s1")] == ["create", "expire"]

    def test_scan_lists_every_stored_record(self, sm: StateManager) -> None:
        for n in range(7):
            sm.register_state(f"u{n}", "user", user(n=n))
        sm.register_state("s1", "session", {"data": {}})
        sm.delete_state("u3")
        batches = list(sm.store.scan(batch_size=3))
        assert all(1 <= len(b) <= 3 for b in batches)
        records = {s["state_id"]: s for b in batches for s in b}
        assert sorted(records) == ["s1", *(f"u{n}" for n in range(7))]
        assert len(records) == sum(len(b) for b in batches)  # each once
        assert records["u3"]["status"] == "deleted" and records["u5"] == sm.get_state("u5")
        users = [s["state_id"] for b in sm.store.scan("user", batch_size=2) for s in b]
        assert sorted(users) == [f"u{n}" for n in range(7)]
        assert list(sm.store.scan("cart")) == []

    def test_tally_counts_states_by_type_and_status_and_history(self, sm: StateManager) -> None:
        sm.register_state("u1", "user", user())
        sm.register_state("u2", "user", user())
        sm.transition("u2", "activate")
        sm.register_state("u3", "user", user())
        sm.delete_state("u3")
        sm.register_state("s1", "session", {"data": {}})
        tally = sm.store.tally()
        assert tally.states == {
            "user": {"pending": 1, "active": 1, "deleted": 1},
            "session": {"pending": 1},
        }
        assert tally.history == 6

    # -- health, metrics ------------------------------------------------------------------------

    def test_health_and_metrics(self, sm: StateManager) -> None:
        sm.register_state("u1", "user", user())
        sm.register_state("u2", "user", user())
        sm.delete_state("u2")
        health = sm.get_health_status()
        assert health["status"] == "healthy"
        assert health["state_count"] == 1
        assert health["checks"]["database"]["status"] == "up"
        assert health["checks"]["database"]["latency_ms"] >= 0
        with pytest.raises(StateExistsError):
            sm.register_state("u1", "user", user())
        metrics = sm.get_metrics()
        assert metrics["operations"]["register_state"] == 3
        assert metrics["errors"] == {"register_state:StateExistsError": 1}
        assert metrics["transitions"]["user:create"] == 2
        assert metrics["transitions"]["user:delete"] == 1
        assert metrics["latency"]["register_state"]["count"] == 3


@pytest.mark.parametrize(
    ("document", "where"),
    [
        ({"a": [1, {"b": float("nan")}]}, "data.a[1].b: nan is not a JSON number"),
        ({"a": {"b": "x\x00"}}, "data.a.b: contains a NUL character"),
        ({"a": [[1, 2, 2**64]]}, "data.a[0][2]: integer"),
        ({"a": {3: 1}}, "data.a: key 3 is not a string"),
        ({"a": [{"x": 1}, {"x": {"y": {}}}]}, "data.a[1].x: nested deeper than 3 levels"),
    ],
)
def test_a_refused_document_names_the_path_to_what_is_wrong(document: Any, where: str) -> None:
    with pytest.raises((StateValidationError, StateLimitError)) as info:
        check_document(document, "data", max_depth=3)
    assert where in str(info.value)


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path) -> dict[str, Any]:
        return {"STATEMANAGER_STORE": "memory"}


class TestSQLiteStore(StoreContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path) -> dict[str, Any]:
        return {}  # the embedded default: a SQLite file in the instance folder


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path, postgres_url: str) -> dict[str, Any]:
        return {"STATEMANAGER_DATABASE_URI": postgres_url}
