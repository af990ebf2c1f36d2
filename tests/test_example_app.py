"""The example app, through Flask's test client, on the memory store (SQLite
where a test looks at the raw rows).

Every test builds its app with :func:`example_app.create_app` after the autouse
``_no_leaks`` fixture has reset the singleton; ``create_app`` puts the example's
definitions (user schema, cart type, migration, guard, callback) back when a
reset removed them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography.fernet import Fernet
from flask import Flask
from flask.testing import FlaskClient

from example_app import (
    CART_HISTORY,
    CART_TTL,
    DEV_KEY_FILE,
    CartSchema,
    create_app,
    define_states,
    seed_demo_users,
    state_manager,
)

JSON = "application/json"
#: One key for the whole module, so no test writes a development key file.
TEST_KEY = Fernet.generate_key().decode()
PHONE = "+263771234567"


def _make_app(**config: Any) -> Flask:
    return create_app(
        {
            "TESTING": True,
            "STATEMANAGER_STORE": "memory",
            "STATEMANAGER_ENCRYPTION_KEYS": TEST_KEY,
            "EXAMPLE_SEED_DEMO_USERS": False,
            **config,
        }
    )


def _sqlite_app(tmp_path: Path, **config: Any) -> Flask:
    """The app on a SQLite file in *tmp_path*, which :func:`_rows` reads directly."""
    return create_app(
        {
            "TESTING": True,
            "STATEMANAGER_DATABASE_URI": f"sqlite:///{tmp_path / 'states.sqlite3'}",
            "STATEMANAGER_ENCRYPTION_KEYS": TEST_KEY,
            "EXAMPLE_SEED_DEMO_USERS": False,
            **config,
        },
        instance_path=str(tmp_path / "instance"),
    )


def _rows(tmp_path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run *sql* on the app's SQLite file behind the state manager's back."""
    with sqlite3.connect(tmp_path / "states.sqlite3") as conn:
        rows = conn.execute(sql, args).fetchall()
    conn.close()
    return rows


@pytest.fixture
def app() -> Flask:
    return _make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _register(client: FlaskClient, user_id: str, **data: Any) -> dict[str, Any]:
    payload = {"name": user_id.title(), "data": {"email": f"{user_id}@example.com", **data}}
    response = client.post(f"/users/{user_id}", json=payload)
    assert response.status_code == 201, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value)


# -- routes and reads ------------------------------------------------------------


def test_index_lists_every_route_with_a_description(client: FlaskClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    body = response.get_json()
    assert body["app"] == "flask-statemanager example"
    routes = {(method, r["rule"]) for r in body["routes"] for method in r["methods"]}
    assert {
        ("GET", "/"),
        ("GET", "/users"),
        ("POST", "/users/<user_id>"),
        ("GET", "/users/<user_id>"),
        ("DELETE", "/users/<user_id>"),
        ("GET", "/users/<user_id>/history"),
        ("POST", "/carts/<cart_id>"),
        ("GET", "/carts/<cart_id>"),
        ("POST", "/carts/<cart_id>/items"),
        ("GET", "/states/<state_id>/verify"),
        # added by init_app
        ("GET", "/health"),
        ("GET", "/health/live"),
        ("GET", "/health/ready"),
        ("GET", "/metrics"),
    } <= routes
    assert all(r["description"] for r in body["routes"])
    assert body["operations"] == {
        "health": "/health",
        "liveness": "/health/live",
        "readiness": "/health/ready",
        "metrics": "/metrics",
    }


def test_index_without_the_operations_endpoints() -> None:
    app = _make_app(STATEMANAGER_HEALTH_URL_PREFIX=None, STATEMANAGER_METRICS_URL=None)
    body = app.test_client().get("/").get_json()
    assert set(body["operations"].values()) == {None}
    assert not [r for r in body["routes"] if r["rule"].startswith(("/health", "/metrics"))]


def test_register_then_get_with_etag(client: FlaskClient) -> None:
    response = client.post(
        "/users/linus",
        json={"name": "Linus", "data": {"email": "linus@example.com", "plan": "pro"}},
        headers={"X-Actor": "signup"},
    )
    assert response.status_code == 201
    assert response.headers["Location"].endswith("/users/linus")
    assert response.headers["ETag"] == '"1"'
    created = response.get_json()
    assert created["state_id"] == "linus"
    assert created["name"] == "Linus"
    assert created["type"] == "user"
    assert created["status"] == "pending"
    assert created["version"] == 1
    assert created["data"] == {"email": "linus@example.com", "plan": "pro"}
    assert created["expires_at"] is None

    response = client.get("/users/linus")
    assert response.status_code == 200
    assert response.get_etag() == ("1", False)
    assert response.get_json() == created

    again = client.post("/users/linus", json={"data": {"email": "linus@example.com"}})
    assert again.status_code == 409
    assert again.get_json()["error"] == "StateExistsError"


def test_demo_users_are_seeded_once() -> None:
    app = _make_app(EXAMPLE_SEED_DEMO_USERS=True)
    client = app.test_client()
    ada = client.get("/users/ada").get_json()
    grace = client.get("/users/grace").get_json()
    assert (ada["status"], ada["version"], ada["data"]["role"]) == ("active", 2, "admin")
    assert (grace["status"], grace["version"]) == ("pending", 1)
    with app.app_context():
        assert seed_demo_users(state_manager) == []


# -- transitions and conditional writes --------------------------------------------


def test_activate_and_suspend_with_if_match(client: FlaskClient) -> None:
    _register(client, "linus")
    response = client.post("/users/linus/activate", headers={"If-Match": '"1"'})
    assert response.status_code == 200
    assert response.get_json()["status"] == "active"
    assert response.headers["ETag"] == '"2"'

    stale = client.post("/users/linus/suspend", headers={"If-Match": '"1"'})
    assert stale.status_code == 409
    body = stale.get_json()
    assert body["error"] == "StateConflictError"
    assert (body["expected_version"], body["actual_version"]) == (1, 2)
    # Nothing was written.
    current = client.get("/users/linus")
    assert (current.get_json()["status"], current.get_etag()) == ("active", ("2", False))

    # The ETag as sent back (weak or strong) is accepted.
    response = client.post("/users/linus/suspend", headers={"If-Match": 'W/"2"'})
    assert response.status_code == 200
    assert response.get_json()["status"] == "suspended"
    response = client.post("/users/linus/resume")  # no If-Match: unconditional
    assert response.status_code == 200
    assert response.get_json()["version"] == 4


def test_invalid_transition_is_422_with_allowed_transitions(client: FlaskClient) -> None:
    _register(client, "linus")
    response = client.post("/users/linus/resume")
    assert response.status_code == 422
    body = response.get_json()
    assert body["error"] == "InvalidTransitionError"
    assert body["current_status"] == "pending"
    assert body["allowed"] == ["activate", "delete", "expire", "update"]
    assert body["messages"]["transition"] and "resume" in body["messages"]["transition"][0]
    assert client.get("/users/linus").get_json()["version"] == 1


def test_guard_keeps_admins_active() -> None:
    client = _make_app(EXAMPLE_SEED_DEMO_USERS=True).test_client()
    response = client.post("/users/ada/suspend")
    assert response.status_code == 422
    body = response.get_json()
    assert body["error"] == "StateValidationError"
    assert "admins_stay_active" in body["message"]
    assert client.get("/users/ada").get_json()["status"] == "active"


def test_delete_keeps_history_and_frees_the_id(client: FlaskClient) -> None:
    _register(client, "linus")
    assert client.delete("/users/linus", headers={"If-Match": '"1"'}).status_code == 204
    assert client.get("/users/linus").status_code == 404
    history = client.get("/users/linus/history").get_json()["changes"]
    assert [c["transition"] for c in history] == ["create", "delete"]

    again = _register(client, "linus")
    assert (again["version"], again["status"]) == (3, "pending")


# -- not found and invalid input ---------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", "/users/nobody"),
        ("post", "/users/nobody/activate"),
        ("delete", "/users/nobody"),
        ("get", "/users/nobody/history"),
        ("get", "/carts/nobody"),
    ],
)
def test_unknown_user_is_404(client: FlaskClient, method: str, url: str) -> None:
    response = getattr(client, method)(url)
    assert response.status_code == 404
    assert response.get_json()["error"] == "StateNotFoundError"


def test_ids_of_another_type_are_404(client: FlaskClient) -> None:
    _register(client, "linus")
    assert client.post("/carts/cart_1", json={"data": {"items": []}}).status_code == 201
    assert client.get("/carts/linus").status_code == 404
    assert client.get("/users/cart_1").status_code == 404
    assert client.post("/users/cart_1/activate").status_code == 404


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", "/users/a%20b"),
        ("get", "/users/%C3%BC"),
        ("get", "/users/a%00b"),
        ("get", "/users/" + "a" * 256),
        ("post", "/users/a%20b"),
        ("post", "/users/a%20b/activate"),
        ("delete", "/users/a%20b"),
        ("get", "/users/a%20b/history"),
        ("post", "/carts/a%20b"),
        ("get", "/carts/a%20b"),
    ],
)
def test_bad_state_id_is_422(client: FlaskClient, method: str, url: str) -> None:
    kwargs: dict[str, Any] = {"json": {"data": {"email": "x@example.com"}}}
    response = getattr(client, method)(url, **(kwargs if method == "post" else {}))
    assert response.status_code == 422
    body = response.get_json()
    assert body["error"] == "StateValidationError"
    assert "state_id" in body["messages"]


def test_schema_violation_is_422_with_field_messages(client: FlaskClient) -> None:
    response = client.post(
        "/users/linus",
        json={"data": {"email": "not-an-email", "plan": "gold", "credits": -1, "nickname": "x"}},
    )
    assert response.status_code == 422
    body = response.get_json()
    assert body["error"] == "StateValidationError"
    assert set(body["messages"]["data"]) == {"email", "plan", "credits", "nickname"}
    assert all(isinstance(m, list) and m for m in body["messages"]["data"].values())

    missing = client.post("/users/linus", json={"data": {"plan": "pro"}})
    assert missing.status_code == 422
    assert list(missing.get_json()["messages"]["data"]) == ["email"]
    assert client.get("/users/linus").status_code == 404


# -- search and history --------------------------------------------------------------


def test_search_by_status_with_paging(client: FlaskClient) -> None:
    for n in range(1, 6):
        _register(client, f"user_{n}", plan="pro" if n % 2 else "free", credits=n)
    for n in (1, 2, 3):
        assert client.post(f"/users/user_{n}/activate").status_code == 200

    first = client.get("/users?status=active&per_page=2").get_json()
    assert (first["total"], first["pages"], first["page"], first["per_page"]) == (3, 2, 1, 2)
    assert (first["has_next"], first["has_prev"]) == (True, False)
    second = client.get("/users?status=active&per_page=2&page=2").get_json()
    assert (second["page"], second["has_next"], second["has_prev"]) == (2, False, True)
    items = first["items"] + second["items"]
    assert [s["state_id"] for s in items] == ["user_3", "user_2", "user_1"]  # -updated_at
    assert all(s["status"] == "active" for s in items)

    def ids(query: str) -> list[str]:
        response = client.get(f"/users?{query}")
        assert response.status_code == 200, response.get_json()
        return sorted(s["state_id"] for s in response.get_json()["items"])

    assert ids("status=pending") == ["user_4", "user_5"]
    assert ids("status=active&plan=pro") == ["user_1", "user_3"]
    assert ids("status=active&status=pending&min_credits=4") == ["user_4", "user_5"]
    assert ids("plan=free") == ["user_2", "user_4"]
    assert ids("role=admin") == []
    beyond = client.get("/users?status=active&per_page=2&page=3").get_json()
    assert (beyond["items"], beyond["total"]) == ([], 3)


def test_history_timeline_is_oldest_first(client: FlaskClient) -> None:
    _register(client, "linus")
    for transition in ("activate", "suspend", "resume"):
        response = client.post(f"/users/linus/{transition}", headers={"X-Actor": "support"})
        assert response.status_code == 200

    response = client.get("/users/linus/history")
    assert response.status_code == 200
    body = response.get_json()
    assert body["state_id"] == "linus"
    changes = body["changes"]
    assert [c["transition"] for c in changes] == ["create", "activate", "suspend", "resume"]
    assert [c["version"] for c in changes] == [1, 2, 3, 4]
    assert [c["actor"] for c in changes] == ["api", "support", "support", "support"]
    statuses = [(c["metadata"]["from_status"], c["metadata"]["to_status"]) for c in changes]
    assert statuses == [
        (None, "pending"),
        ("pending", "active"),
        ("active", "suspended"),
        ("suspended", "active"),
    ]
    times = [_when(c["created_at"]) for c in changes]
    assert times == sorted(times)
    assert changes[0]["old_data"] is None
    assert changes[0]["new_data"] == {"email": "linus@example.com"}


# -- carts and TTL -----------------------------------------------------------------------


def test_cart_gets_the_default_ttl(client: FlaskClient) -> None:
    response = client.post(
        "/carts/cart_1", json={"data": {"items": [{"sku": "A1", "quantity": 2}]}}
    )
    assert response.status_code == 201
    cart = response.get_json()
    assert (cart["type"], cart["status"]) == ("cart", "pending")
    lifetime = _when(cart["expires_at"]) - _when(cart["created_at"])
    assert lifetime == timedelta(seconds=CART_TTL) == timedelta(minutes=30)
    response = client.get("/carts/cart_1")
    assert response.status_code == 200
    assert response.get_json()["data"] == {"items": [{"sku": "A1", "quantity": 2}]}


def test_expired_cart_is_gone_and_its_id_reusable(app: Flask, client: FlaskClient) -> None:
    state_manager.register_type("cart", default_ttl=0.05, schema=CartSchema)  # short-lived
    assert client.post("/carts/cart_1", json={"data": {"items": []}}).status_code == 201
    assert client.get("/carts/cart_1").status_code == 200
    time.sleep(0.1)

    assert client.get("/carts/cart_1").status_code == 404
    with app.app_context():
        expired = state_manager.get_state("cart_1", include_expired=True)
        assert expired is not None and expired["status"] == "expired"
        history = state_manager.get_state_history("cart_1")
    assert [(c["transition"], c["actor"]) for c in history] == [
        ("create", "api"),
        ("expire", "ttl"),
    ]

    response = client.post("/carts/cart_1", json={"data": {"items": [{"sku": "B", "quantity": 1}]}})
    assert response.status_code == 201
    assert (response.get_json()["version"], response.get_json()["status"]) == (3, "pending")


# -- cart items, retention and limits ---------------------------------------------------


def test_adding_items_merges_lines_and_writes_one_change_each(client: FlaskClient) -> None:
    assert client.post("/carts/cart_1", json={"data": {"items": []}}).status_code == 201
    for sku, quantity in [("A1", 2), ("B2", 1), ("A1", 3)]:
        response = client.post("/carts/cart_1/items", json={"sku": sku, "quantity": quantity})
        assert response.status_code == 200, response.get_json()
    cart = response.get_json()
    assert cart["data"] == {"items": [{"sku": "A1", "quantity": 5}, {"sku": "B2", "quantity": 1}]}
    assert (cart["version"], response.headers["ETag"]) == (4, '"4"')

    bad = client.post("/carts/cart_1/items", json={"sku": "", "quantity": "2", "colour": "red"})
    assert bad.status_code == 422
    assert set(bad.get_json()["messages"]) == {"sku", "quantity", "colour"}
    # The schema checks the merged cart: 5 + 995 is above the 999 a line may hold.
    too_many = client.post("/carts/cart_1/items", json={"sku": "A1", "quantity": 995})
    assert too_many.status_code == 422
    assert too_many.get_json()["error"] == "StateValidationError"
    assert client.get("/carts/cart_1").get_json()["version"] == 4


def test_prune_keeps_the_newest_cart_history_and_the_chain_verifies(
    app: Flask, client: FlaskClient
) -> None:
    assert client.post("/carts/cart_1", json={"data": {"items": []}}).status_code == 201
    for _ in range(CART_HISTORY + 5):
        assert (
            client.post("/carts/cart_1/items", json={"sku": "A1", "quantity": 1}).status_code == 200
        )
    _register(client, "linus")  # users keep all their history

    with app.app_context():
        assert len(state_manager.get_state_history("cart_1")) == CART_HISTORY + 6
        report = state_manager.prune()
        versions = [c["version"] for c in state_manager.get_state_history("cart_1")]
        assert len(state_manager.get_state_history("linus")) == 1
    assert (report.entries, report.types) == (6, {"cart": (6, 0)})
    assert versions == list(range(7, CART_HISTORY + 7))
    # The oldest entry left anchors the chain; the state's version is unchanged.
    assert client.get("/states/cart_1/verify").get_json()["intact"] is True
    assert client.get("/carts/cart_1").get_json()["version"] == CART_HISTORY + 6


def test_live_carts_are_capped(client: FlaskClient) -> None:
    # The example allows MAX_CARTS; the same definition with a cap of two.
    state_manager.register_type(
        "cart", default_ttl=CART_TTL, schema=CartSchema, keep_history=CART_HISTORY, max_states=2
    )
    for n in (1, 2):
        assert client.post(f"/carts/cart_{n}", json={"data": {"items": []}}).status_code == 201
    refused = client.post("/carts/cart_3", json={"data": {"items": []}})
    assert refused.status_code == 422
    body = refused.get_json()
    assert (body["error"], list(body["messages"])) == ("StateLimitError", ["states"])
    assert client.get("/carts/cart_3").status_code == 404


# -- data migration --------------------------------------------------------------------------


def test_cart_stored_in_schema_1_0_reads_upgraded(tmp_path: Path) -> None:
    app = _sqlite_app(tmp_path)
    client = app.test_client()
    # The previous release: carts had no schema yet, and items a "qty".
    state_manager.register_type("cart", default_ttl=CART_TTL)
    with app.app_context():
        state_manager.register_state(
            "cart_old",
            "cart",
            {"data": {"items": [{"sku": "A1", "qty": 2}]}, "metadata": {"version": "1.0"}},
        )
    define_states(state_manager)  # this release: schema 1.1 and the 1.0 -> 1.1 migration

    [(data, meta)] = _rows(
        tmp_path, "SELECT data, metadata FROM statemanager_states WHERE state_id = 'cart_old'"
    )
    assert json.loads(data) == {"items": [{"sku": "A1", "qty": 2}]}
    assert json.loads(meta)["version"] == "1.0"

    cart = client.get("/carts/cart_old").get_json()
    assert cart["data"] == {"items": [{"sku": "A1", "quantity": 2}]}
    assert (cart["metadata"]["version"], cart["version"]) == ("1.1", 1)

    # The next write stores it upgraded; its history entry says so.
    response = client.post("/carts/cart_old/items", json={"sku": "A1", "quantity": 1})
    assert response.get_json()["data"] == {"items": [{"sku": "A1", "quantity": 3}]}
    [(data, meta)] = _rows(
        tmp_path, "SELECT data, metadata FROM statemanager_states WHERE state_id = 'cart_old'"
    )
    assert (json.loads(data), json.loads(meta)["version"]) == (
        {"items": [{"sku": "A1", "quantity": 3}]},
        "1.1",
    )
    with app.app_context():
        update = state_manager.get_state_history("cart_old")[-1]
    assert (update["metadata"]["migrated_from"], update["metadata"]["migrated_to"]) == (
        "1.0",
        "1.1",
    )


# -- encryption at rest ------------------------------------------------------------------------


def test_phone_reads_back_in_plaintext_but_is_stored_encrypted(tmp_path: Path) -> None:
    client = _sqlite_app(tmp_path).test_client()
    created = _register(client, "linus", phone=PHONE)
    assert created["data"]["phone"] == PHONE
    assert client.get("/users/linus").get_json()["data"]["phone"] == PHONE
    assert client.post("/users/linus/activate").get_json()["data"]["phone"] == PHONE
    history = client.get("/users/linus/history").get_json()["changes"]
    assert [c["new_data"]["phone"] for c in history] == [PHONE, PHONE]

    [(data,)] = _rows(tmp_path, "SELECT data FROM statemanager_states")
    stored = json.loads(data)
    assert stored["email"] == "linus@example.com"  # other fields stay readable
    assert stored["phone"].startswith("fernet:")
    raw = [
        *_rows(tmp_path, "SELECT * FROM statemanager_states"),
        *_rows(tmp_path, "SELECT * FROM statemanager_history"),
    ]
    assert len(raw) == 3
    assert not [row for row in raw if PHONE[1:] in repr(row)]


def test_without_a_key_a_development_key_is_made_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STATEMANAGER_ENCRYPTION_KEYS", raising=False)
    monkeypatch.delenv("FLASK_STATEMANAGER_ENCRYPTION_KEYS", raising=False)
    config = {"TESTING": True, "EXAMPLE_SEED_DEMO_USERS": False}
    instance = tmp_path / "instance"

    first = create_app(config, instance_path=str(instance))
    key_file = instance / DEV_KEY_FILE
    key = key_file.read_text().strip()
    assert first.config["STATEMANAGER_ENCRYPTION_KEYS"] == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    _register(first.test_client(), "linus", phone=PHONE)

    # The next start reuses it, so what the first one encrypted still reads.
    second = create_app(config, instance_path=str(instance))
    assert second.config["STATEMANAGER_ENCRYPTION_KEYS"] == key
    assert second.test_client().get("/users/linus").get_json()["data"]["phone"] == PHONE


def test_the_environment_key_wins_over_a_development_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLASK_STATEMANAGER_ENCRYPTION_KEYS", raising=False)
    monkeypatch.setenv(
        "STATEMANAGER_ENCRYPTION_KEYS", f" {TEST_KEY},{Fernet.generate_key().decode()}"
    )
    app = create_app(
        {"TESTING": True, "STATEMANAGER_STORE": "memory", "EXAMPLE_SEED_DEMO_USERS": False},
        instance_path=str(tmp_path),
    )
    assert app.config["STATEMANAGER_ENCRYPTION_KEYS"].startswith(TEST_KEY + ",")
    assert not os.path.exists(tmp_path / DEV_KEY_FILE)


# -- audit and operations ------------------------------------------------------------------------


def test_verify_finds_a_history_row_edited_in_the_database(tmp_path: Path) -> None:
    client = _sqlite_app(tmp_path).test_client()
    _register(client, "linus", phone=PHONE)
    assert client.post("/users/linus/activate").status_code == 200

    response = client.get("/states/linus/verify")
    assert response.status_code == 200
    assert response.get_json() == {
        "state_id": "linus",
        "intact": True,
        "version": None,
        "reason": None,
    }

    # Someone rewrites the first entry's email behind the application's back.
    _rows(
        tmp_path,
        "UPDATE statemanager_history SET new_data = json_set(new_data, '$.email', ?) "
        "WHERE state_id = 'linus' AND version = 1",
        "mallory@example.com",
    )
    assert client.get("/users/linus/history").get_json()["changes"][0]["new_data"]["email"] == (
        "mallory@example.com"
    )
    body = client.get("/states/linus/verify").get_json()
    assert (body["state_id"], body["intact"], body["version"]) == ("linus", False, 1)
    assert "hash" in body["reason"]


def test_verify_checks_deleted_states_too(client: FlaskClient) -> None:
    _register(client, "linus")
    assert client.delete("/users/linus").status_code == 204
    assert client.get("/states/linus/verify").get_json()["intact"] is True


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_health_answers_healthy(tmp_path: Path, store: str) -> None:
    app = _make_app() if store == "memory" else _sqlite_app(tmp_path)
    client = app.test_client()
    _register(client, "linus")

    response = client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["status"], body["state_count"]) == ("healthy", 1)
    assert body["checks"]["database"]["component"] == store
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert b"statemanager_operations_total" in metrics.data


@pytest.mark.parametrize(
    ("url", "leaks"),
    [
        ("postgresql://admin:s3cret-pw@dbprimary:5432/proddb", ["dbprimary", "admin", "proddb"]),
        ("postgresql://admin:s3cret-pw@127.0.0.1:1/proddb", ["127.0.0.1", "port 1", "admin"]),
        ("postgresql://admin_nobody:s3cret-pw@{server}/proddb", ["admin_nobody", "proddb"]),
    ],
    ids=["unknown host", "refused", "unknown role"],
)
def test_database_down_is_503_without_hosts_or_roles(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
    url: str,
    leaks: list[str],
) -> None:
    if "{server}" in url:  # the real server, which answers: the role does not exist
        server = urlsplit(request.getfixturevalue("postgres_url"))
        url = url.format(server=f"{server.hostname}:{server.port}")
    app = _sqlite_app(tmp_path, STATEMANAGER_DATABASE_URI=url, STATEMANAGER_CONNECT_TIMEOUT=2)
    client = app.test_client()
    for response in (
        client.get("/users/linus"),
        client.get("/users?plan=pro"),
        client.post("/users/linus", json={"data": {"email": "linus@example.com"}}),
    ):
        assert response.status_code == 503
        body = response.get_json()
        assert body["error"] == "BackendUnavailableError"
        assert body["message"].startswith("The postgresql database is unavailable: ")
        for leak in [*leaks, "s3cret-pw", "://"]:
            assert leak not in body["message"], body["message"]
    # The operator still finds the whole message in the log.
    assert any(leaks[0] in record.getMessage() for record in caplog.records)


# -- no bad input gives a 5xx ------------------------------------------------------------

_USER = {"data": {"email": "new@example.com"}}


def _raw(text: str) -> dict[str, Any]:
    return {"data": text, "content_type": JSON}


def _nested(depth: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return {"nested": value}


BAD_REQUESTS: list[Any] = [
    # request body
    ("post", "/users/new", _raw("not json"), 400),
    ("post", "/users/new", _raw("[1, 2]"), 400),
    ("post", "/users/new", _raw('"a string"'), 400),
    ("post", "/users/new", _raw("[" * 100_000), 400),
    ("post", "/users/new", {"data": b"\xff\xfe", "content_type": JSON}, 400),
    ("post", "/users/new", {"json": {"email": "new@example.com"}}, 422),
    ("post", "/users/new", {"json": {"data": "not an object"}}, 422),
    ("post", "/users/new", {"json": {"data": [1, 2]}}, 422),
    ("post", "/users/new", {"json": {**_USER, "metadata": [1]}}, 422),
    ("post", "/users/new", {"json": {**_USER, "type": "cart"}}, 422),
    ("post", "/users/new", {"json": {**_USER, "name": 5}}, 422),
    ("post", "/users/new", {"json": {**_USER, "name": "n" * 256}}, 422),
    ("post", "/users/new", {"json": {"data": {"email": "a@b.co", "credits": 10**30}}}, 422),
    ("post", "/users/new", _raw('{"data": {"email": "a@b.co", "credits": NaN}}'), 422),
    ("post", "/users/new", _raw('{"data": {"email": "a@b.co"}, "metadata": {"x": Infinity}}'), 422),
    ("post", "/users/new", {"json": {**_USER, "metadata": _nested(40)}}, 422),
    ("post", "/users/new", {"json": {**_USER, "metadata": {"blob": "x" * 1_200_000}}}, 422),
    ("post", "/users/new", {"json": {**_USER, "metadata": {"blob": "x" * 2_200_000}}}, 413),
    ("post", "/carts/new", {"json": {"data": {"items": []}, "type": "user"}}, 422),
    ("post", "/carts/new", {"json": {"items": []}}, 422),
    ("post", "/carts/new", {"json": {"data": {"items": [{"sku": "A1", "qty": 2}]}}}, 422),
    ("post", "/carts/new", {"json": {"data": {"items": [{"sku": "A1", "quantity": 0}]}}}, 422),
    ("post", "/carts/new/items", {"json": {"sku": "A1", "quantity": 1}}, 404),
    ("post", "/carts/grace/items", {"json": {"sku": "A1", "quantity": 1}}, 404),
    ("post", "/users/new", {"json": {"data": {"email": "a@b.co", "phone": "0771234"}}}, 422),
    ("post", "/users/new", {"json": {"data": {"email": "a@b.co", "phone": 263771234567}}}, 422),
    # headers
    ("post", "/users/new", {"json": _USER, "headers": {"X-Actor": "a" * 256}}, 422),
    ("post", "/users/grace/activate", {"headers": {"If-Match": "*"}}, 422),
    ("post", "/users/grace/activate", {"headers": {"If-Match": '"0"'}}, 422),
    ("post", "/users/grace/activate", {"headers": {"If-Match": '"abc"'}}, 422),
    ("post", "/users/grace/activate", {"headers": {"If-Match": '"7"'}}, 409),
    ("delete", "/users/grace", {"headers": {"If-Match": "nope"}}, 422),
    # state and transitions
    ("post", "/users/ada", {"json": _USER}, 409),
    ("post", "/users/grace/resume", {}, 422),
    ("post", "/users/ada/suspend", {}, 422),
    # query arguments
    ("get", "/users?page=0", {}, 422),
    ("get", "/users?page=-1", {}, 422),
    ("get", "/users?page=abc", {}, 422),
    ("get", "/users?per_page=0", {}, 422),
    ("get", "/users?per_page=501", {}, 422),
    ("get", "/users?per_page=1.5", {}, 422),
    ("get", "/users?min_credits=lots", {}, 422),
    ("get", "/users?bogus=1", {}, 422),
    ("get", "/users?data.plan=pro", {}, 422),
    ("get", "/users?phone=%2B263771234567", {}, 422),
    # verification
    ("get", "/states/nobody/verify", {}, 404),
    ("get", "/states/a%20b/verify", {}, 422),
    ("post", "/states/grace/verify", {}, 405),
    # routing
    ("post", "/users/ada/frobnicate", {}, 404),
    ("put", "/users/ada", {"json": _USER}, 405),
    ("patch", "/users/ada", {"json": _USER}, 405),
    ("delete", "/carts/ada", {}, 405),
    ("get", "/nowhere", {}, 404),
    # lone UTF-16 surrogates: valid JSON escapes, but not storable text
    (
        "post",
        "/users/new",
        _raw('{"data": {"email": "a@b.co"}, "metadata": {"x": "\\ud800"}}'),
        422,
    ),
    ("post", "/carts/new", _raw('{"data": {"items": ["\\udc00"]}}'), 422),
    ("post", "/carts/new", _raw('{"data": {"\\ud800": 1}}'), 422),
]


@pytest.mark.parametrize(("method", "url", "kwargs", "status"), BAD_REQUESTS)
def test_bad_requests_are_4xx_with_a_json_message(
    method: str, url: str, kwargs: dict[str, Any], status: int
) -> None:
    # TESTING propagates exceptions, so a would-be 500 fails here with its traceback.
    client = _make_app(EXAMPLE_SEED_DEMO_USERS=True).test_client()
    before = client.get("/users/grace").get_json()

    response = getattr(client, method)(url, **kwargs)

    assert response.status_code == status, response.get_data(as_text=True)[:500]
    body = response.get_json()
    assert body["error"] and body["message"]
    if status == 422:
        assert body["messages"]
    # Nothing was written.
    assert client.get("/users/new").status_code == 404
    assert client.get("/carts/new").status_code == 404
    assert client.get("/users/grace").get_json() == before
