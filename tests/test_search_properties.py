"""Property tests: every store's search agrees with the reference semantics.

Random filters (fields, operators, values of every JSON type) run against the
same documents on each store; the ids found must be exactly those for which
:func:`flask_statemanager.query.matches` holds. Bad filter keys never reach a
database: they are refused with a typed error.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flask_statemanager import StateManager, StateValidationError
from flask_statemanager.query import matches, parse_conditions

from .conftest import make_app

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.sampled_from([0.5, 1.0, 2.5, -1.5]),
    st.text(alphabet="abc", max_size=3),
)
# All-digit segments name object keys (never array indexes); NULL is a key like any other.
FIELDS = [
    "data.a",
    "data.b",
    "data.n.x",
    "metadata.m",
    "data.t.0",
    "data.t.1",
    "data.NULL",
    "data.null",
]


def _documents() -> list[dict[str, Any]]:
    """A fixed, varied corpus: seeded random documents plus hand-picked edge cases."""
    rng = random.Random(7)
    pool: list[Any] = [None, True, False, -2, 0, 1, 3, 0.5, 1.0, 2.5, "", "a", "ab", "bca"]

    def value() -> Any:
        return rng.sample(pool, rng.randint(0, 3)) if rng.random() < 0.2 else rng.choice(pool)

    corpus: list[dict[str, Any]] = []
    for _ in range(60):
        doc: dict[str, Any] = {k: value() for k in ("a", "b") if rng.random() < 0.8}
        if rng.random() < 0.5:
            doc["n"] = {"x": value()} if rng.random() < 0.7 else value()
        if rng.random() < 0.5:
            t = rng.random()
            doc["t"] = (
                {"0": value(), "1": value()}
                if t < 0.4
                else [value(), value()]
                if t < 0.8
                else value()
            )
        if rng.random() < 0.3:
            doc[rng.choice(["NULL", "null"])] = value()
        corpus.append(doc)
    # Hand-picked edge cases alongside the generated ones.
    corpus += [
        {"a": 1},
        {"a": 1.0},
        {"a": True},
        {"a": "1"},
        {"a": None},
        {"a": [1, "a"]},
        {"a": "abc"},
        {"a": ""},
        {"b": [True, None]},
        {"n": {"x": 2}},
        {"n": 2},
        {"t": ["a", 1]},
        {"t": {"0": "a", "1": 1}},
        {"t": [[1], {"0": 1}]},
        {"NULL": 1, "null": None},
        {},
    ]
    return corpus


@pytest.fixture(scope="module", params=["memory", "sqlite", "postgresql"])
def loaded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Flask, list[dict[str, Any]]]]:
    tmp = tmp_path_factory.mktemp(request.param)
    config: dict[str, Any] = {"memory": {"STATEMANAGER_STORE": "memory"}, "sqlite": {}}.get(
        request.param, {}
    )
    if request.param == "postgresql":
        config = {"STATEMANAGER_DATABASE_URI": request.getfixturevalue("postgres_url")}
    StateManager.reset_instance()
    manager = StateManager()
    manager.register_type("doc", indexes=["data.a", "data.t.0", "data.NULL"])
    app = make_app(tmp, **config)
    manager.init_app(app)
    records = []
    with app.app_context():
        manager.create_all()
        manager.store.reset()
        for i, data in enumerate(_documents()):
            meta = {"m": data.get("a")} if i % 2 else {}
            records.append(manager.register_state(f"d{i}", "doc", {"data": data, "metadata": meta}))
    yield app, records
    StateManager.reset_instance()


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    # The module-scoped app above outlives single tests; keep the singleton.
    yield


OPS = ["", "__ne", "__gt", "__gte", "__lt", "__lte", "__in", "__contains", "__exists"]


@st.composite
def filters(draw: st.DrawFn) -> dict[str, Any]:
    result = {}
    for _ in range(draw(st.integers(1, 2))):
        field, op = draw(st.sampled_from(FIELDS)), draw(st.sampled_from(OPS))
        if op == "__exists":
            value: Any = draw(st.booleans())
        elif op == "__in":
            value = draw(st.lists(SCALARS, min_size=1, max_size=3))
        elif op in ("__gt", "__gte", "__lt", "__lte"):
            value = draw(
                st.one_of(
                    st.integers(-5, 5),
                    st.sampled_from([0.5, 2.5]),
                    st.text(alphabet="abc", max_size=2),
                )
            )
        else:
            value = draw(SCALARS)
        result[field + op] = value
    return result


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(query=filters())
def test_search_matches_reference(
    loaded: tuple[Flask, list[dict[str, Any]]], query: dict[str, Any]
) -> None:
    app, records = loaded
    conditions = parse_conditions(query)
    expected = sorted(r["state_id"] for r in records if all(matches(r, c) for c in conditions))
    with app.app_context():
        page = StateManager().search_states("doc", query, per_page=500)
    assert sorted(s["state_id"] for s in page) == expected
    assert page.total == len(expected)


@settings(max_examples=100, deadline=None)
@given(key=st.text(alphabet=string.printable, min_size=1, max_size=20))
def test_arbitrary_filter_keys_are_refused_or_plain(key: str) -> None:
    try:
        conditions = parse_conditions({key: 1})
    except StateValidationError as exc:
        assert exc.messages
        return
    (condition,) = conditions
    assert all(part.replace("_", "").isalnum() and part.isascii() for part in condition.path)
