"""The example app, through Flask's test client, on the memory store.

Every test builds its app with :func:`example_app.create_app` after the autouse
``_no_leaks`` fixture has reset the singleton; ``create_app`` puts the example's
definitions (user schema, cart type, guard, callback) back when a reset removed them.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from example_app import CART_TTL, create_app, seed_demo_users, state_manager

JSON = "application/json"


def _make_app(**config: Any) -> Flask:
    return create_app(
        {
            "TESTING": True,
            "STATEMANAGER_STORE": "memory",
            "EXAMPLE_SEED_DEMO_USERS": False,
            **config,
        }
    )


@pytest.fixture
def app() -> Flask:
    return _make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _register(client: FlaskClient, user_id: str, **data: Any) -> dict[str, Any]:
    body = {"name": user_id.title(), "data": {"email": f"{user_id}@example.com", **data}}
    response = client.post(f"/users/{user_id}", json=body)
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
    } <= routes
    assert all(r["description"] for r in body["routes"])


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
    response = client.post("/carts/cart_1", json={"data": {"items": [{"sku": "A1", "qty": 2}]}})
    assert response.status_code == 201
    cart = response.get_json()
    assert (cart["type"], cart["status"]) == ("cart", "pending")
    lifetime = _when(cart["expires_at"]) - _when(cart["created_at"])
    assert lifetime == timedelta(seconds=CART_TTL) == timedelta(minutes=30)
    response = client.get("/carts/cart_1")
    assert response.status_code == 200
    assert response.get_json()["data"] == {"items": [{"sku": "A1", "qty": 2}]}


def test_expired_cart_is_gone_and_its_id_reusable(app: Flask, client: FlaskClient) -> None:
    state_manager.register_type("cart", default_ttl=0.05)  # a short-lived cart type
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

    response = client.post("/carts/cart_1", json={"data": {"items": ["new"]}})
    assert response.status_code == 201
    assert (response.get_json()["version"], response.get_json()["status"]) == (3, "pending")


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
