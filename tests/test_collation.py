"""Strings compare by code point on PostgreSQL too (``COLLATE "C"``), as on every store.

The test server's databases are C-collated, where the default collation already
is code point order. These tests make a database of their own whose default
collation is a language's (ICU ``en-US``, where ``'a' < 'B' < 'b'``), and check
that search order, string range filters and keyset paging there give what the
memory store gives; that the indexes still serve the queries; and that
revision 0003 brings a database made at 0002 there, declared indexes included.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from flask import Flask

from flask_statemanager import StateManager
from flask_statemanager.alembic import config, head_revision
from flask_statemanager.stores.sql_tables import index_name

from .conftest import IN_CI, explain_page_query, make_app

#: state_id, and the text in its name and data (ids allow only [A-Za-z0-9_.:@-]).
ROWS = [
    ("a", "a"),
    ("B", "B"),
    ("b", "b"),
    ("A", "A"),
    ("Z", "é"),
    ("_x", "Z"),
    ("0", "_"),
    ("-", "0"),
    ("a-b", "ab"),
    ("a_b", "aB"),
    ("ab", "Ä"),
    ("aB", "e"),
]

#: (filters, order_by) of the searches compared with the memory store.
SEARCHES: list[tuple[dict[str, Any] | None, str]] = [
    (None, "state_id"),
    (None, "-state_id"),
    (None, "name"),
    (None, "-name"),
    (None, "type"),
    ({"data.x__gt": "B"}, "state_id"),
    ({"data.x__gte": "a"}, "name"),
    ({"data.x__lt": "b"}, "-name"),
    ({"data.x__lte": "Z"}, "state_id"),
    ({"data.x__gt": "B", "data.x__lt": "é"}, "state_id"),
    ({"data.n.y__gt": "Z"}, "state_id"),  # a path without a declared index
    ({"metadata.tag__lt": "a"}, "state_id"),
    ({"name__gt": "B"}, "name"),
    ({"name__lte": "a"}, "-name"),
    ({"state_id__lt": "a"}, "state_id"),
    ({"state_id__gte": "_"}, "-state_id"),
    ({"type__gte": "item"}, "name"),
    ({"status__gt": "active"}, "name"),
]

#: Ways to make a database whose default collation is not code point order,
#: the first that the server accepts is used (ICU needs PostgreSQL 15).
_COLLATIONS = (
    "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'",
    "LOCALE 'en_US.UTF-8'",
    "LOCALE 'en_US.utf8'",
)


@pytest.fixture(scope="module")
def language_collated_url(postgres_url: str) -> Iterator[str]:
    """A database of its own on the test server, collated as ``en-US``; dropped at the end."""
    base = sa.make_url(postgres_url.replace("postgresql://", "postgresql+psycopg://", 1))
    name = f"{base.database}_collation_{os.getpid()}"
    url = base.set(database=name)
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        for options in _COLLATIONS:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                try:
                    conn.exec_driver_sql(
                        f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' {options}"
                    )
                except sa.exc.DBAPIError:
                    continue
            probe = sa.create_engine(url)
            with probe.connect() as conn:
                by_language = conn.exec_driver_sql("SELECT 'a' < 'B'").scalar()
            probe.dispose()
            if by_language:
                break
        else:
            message = (
                "The PostgreSQL test server can make no database collated by a language "
                "(neither ICU nor an en_US locale)."
            )
            if IN_CI:
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def _register_type() -> StateManager:
    manager = StateManager()
    manager.register_type("item", indexes=["data.x"])
    return manager


def _app(tmp_path: Path, folder: str, **config: Any) -> Flask:
    app = make_app(tmp_path / folder, **config)
    StateManager().init_app(app)
    return app


def _fill(app: Flask) -> None:
    with app.app_context():
        manager = StateManager()
        for state_id, text in ROWS:
            manager.register_state(
                state_id,
                "item",
                {
                    "name": text,
                    "data": {"x": text, "n": {"y": text}},
                    "metadata": {"version": "1.0", "tag": text},
                },
            )
        manager.transition("b", "activate")  # one status apart


def _found(app: Flask, filters: dict[str, Any] | None, order_by: str) -> list[str]:
    with app.app_context():
        page = StateManager().search_states("item", filters, order_by=order_by, per_page=50)
    return [s["state_id"] for s in page]


def _pages(app: Flask, order_by: str, per_page: int = 5) -> list[str]:
    with app.app_context():
        manager = StateManager()
        return [
            s["state_id"]
            for number in range(1, 4)
            for s in manager.search_states(
                "item", order_by=order_by, page=number, per_page=per_page
            )
        ]


def _walks(app: Flask) -> dict[str, list[str]]:
    """The store's own walks in id order: keyset pages of ids and of states."""
    store: Any = app.extensions["statemanager"].store
    return {
        "state_ids": store.state_ids(None, 100),
        "state_ids after 'a'": store.state_ids("a", 100),
        "scan": [s["state_id"] for batch in store.scan("item", batch_size=5) for s in batch],
    }


def _memory(tmp_path: Path) -> Flask:
    memory = _app(tmp_path, "memory", STATEMANAGER_STORE="memory")
    _fill(memory)
    return memory


def _explain(app: Flask, filters: dict[str, Any] | None, order_by: str) -> str:
    """The plan PostgreSQL makes for the search's page query, sequential scans and sorts
    priced out (so an index that can serve the query is the cheaper plan)."""
    engine = app.extensions["statemanager"].store.engine
    _, plan = explain_page_query(
        engine, lambda: _found(app, filters, order_by), turned_off=("seqscan", "sort")
    )
    return plan


def _collations(url: str, prefix: str) -> dict[str, Any]:
    """The collation of each text column, and of each key of the declared index."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            columns = conn.execute(
                sa.text(
                    "SELECT a.attrelid::regclass::text || '.' || a.attname, c.collname "
                    "FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation "
                    "WHERE a.attrelid IN (to_regclass(:states), to_regclass(:history)) "
                    "AND a.attnum > 0"
                ),
                {"states": f"{prefix}states", "history": f"{prefix}history"},
            ).all()
            index = conn.execute(
                sa.text(
                    "SELECT coalesce(c.collname, '-') FROM pg_index i "
                    "CROSS JOIN LATERAL unnest(i.indcollation::oid[]) "
                    "WITH ORDINALITY AS k(coll, n) "
                    "LEFT JOIN pg_collation c ON c.oid = k.coll "
                    "WHERE i.indexrelid = to_regclass(:index) ORDER BY k.n"
                ),
                {"index": index_name(prefix, "data.x")},
            ).scalars()
            return {"columns": dict(columns), "declared index": list(index)}
    finally:
        engine.dispose()


def _all_c(prefix: str) -> dict[str, str]:
    """Every text column of the two tables, collated "C"."""
    states = ("state_id", "type", "name", "status")
    history = ("change_id", "state_id", "transition", "actor", "hash")
    return {
        **{f"{prefix}states.{c}": "C" for c in states},
        **{f"{prefix}history.{c}": "C" for c in history},
    }


def test_search_and_walks_compare_strings_by_code_point(
    tmp_path: Path, language_collated_url: str
) -> None:
    _register_type()
    memory = _memory(tmp_path)
    # What code point order means: Python's, which the memory store uses.
    assert _found(memory, None, "name") == [i for i, _ in sorted(ROWS, key=lambda r: r[1])]
    assert _found(memory, None, "state_id") == sorted(i for i, _ in ROWS)

    postgres = _app(
        tmp_path,
        "postgres",
        STATEMANAGER_DATABASE_URI=language_collated_url,
        STATEMANAGER_TABLE_PREFIX="coll_new_",
    )
    with postgres.app_context():
        StateManager().create_all()
    _fill(postgres)
    for filters, order_by in SEARCHES:
        expected = _found(memory, filters, order_by)
        assert expected, (filters, order_by)  # every search finds something
        assert _found(postgres, filters, order_by) == expected, (filters, order_by)
    for order_by in ("state_id", "-name"):
        assert _pages(postgres, order_by) == _pages(memory, order_by)
    assert _walks(postgres) == _walks(memory)
    assert _collations(language_collated_url, "coll_new_") == {
        "columns": _all_c("coll_new_"),
        "declared index": ["C", "-", "C"],  # type, the jsonb value, state_id
    }


def test_indexes_serve_searches_on_collated_columns(
    tmp_path: Path, language_collated_url: str
) -> None:
    """The columns carry the collation, so the queries need none of their own and
    every index on them (the primary key, the declared ones) still serves them."""
    _register_type()
    postgres = _app(
        tmp_path,
        "postgres",
        STATEMANAGER_DATABASE_URI=language_collated_url,
        STATEMANAGER_TABLE_PREFIX="coll_plan_",
    )
    with postgres.app_context():
        StateManager().create_all()
    _fill(postgres)
    by_id = _explain(postgres, None, "state_id")
    assert "coll_plan_states_pkey" in by_id and "Sort" not in by_id
    in_range = _explain(postgres, {"state_id__gte": "a"}, "state_id")
    assert "Index Cond" in in_range and "coll_plan_states_pkey" in in_range
    assert "Sort" not in in_range
    assert index_name("coll_plan_", "data.x") in _explain(postgres, {"data.x": "B"}, "state_id")


def test_revision_0003_brings_a_0002_database_to_code_point_order(
    tmp_path: Path, language_collated_url: str
) -> None:
    """Tables and a declared index made at 0002 compare by the database's collation;
    ``upgrade-db`` collates the columns "C", and PostgreSQL rebuilds the index with them."""
    prefix = "coll_old_"
    engine = sa.create_engine(language_collated_url)
    with engine.connect() as conn:
        command.upgrade(config(prefix, connection=conn), "0002")
        # The declared index as init-db made it at 0002.
        conn.exec_driver_sql(
            f"CREATE INDEX {index_name(prefix, 'data.x')} ON {prefix}states "
            f"(type, (data #> '{{\"x\"}}'), state_id)"
        )
        conn.commit()
    engine.dispose()
    _register_type()
    memory = _memory(tmp_path)
    postgres = _app(
        tmp_path,
        "postgres",
        STATEMANAGER_DATABASE_URI=language_collated_url,
        STATEMANAGER_TABLE_PREFIX=prefix,
    )
    _fill(postgres)  # the store writes to 0002 tables as to new ones
    before = _collations(language_collated_url, prefix)
    assert before["declared index"] == ["default", "-", "default"]
    assert set(before["columns"].values()) == {"default"}
    # At 0002 the language's order shows through.
    assert _found(postgres, None, "name") != _found(memory, None, "name")

    result = postgres.test_cli_runner().invoke(args=["states", "upgrade-db"])
    assert result.exit_code == 0, result.output
    assert f"Upgraded the tables: 0002 -> {head_revision()}." in result.output
    assert _collations(language_collated_url, prefix) == {
        "columns": _all_c(prefix),
        "declared index": ["C", "-", "C"],
    }
    for filters, order_by in SEARCHES:
        assert _found(postgres, filters, order_by) == _found(memory, filters, order_by), (
            filters,
            order_by,
        )
    assert _walks(postgres) == _walks(memory)
    assert index_name(prefix, "data.x") in _explain(postgres, {"data.x": "B"}, "state_id")
    with postgres.app_context():  # a write joins the states with the history on state_id
        StateManager().transition("b", "suspend")
        history = StateManager().get_state_history("b")
    assert [c["version"] for c in history] == [1, 2, 3]


def test_revision_0003_names_the_views_that_stop_it(
    tmp_path: Path, language_collated_url: str
) -> None:
    """PostgreSQL cannot collate a column a view uses: upgrade-db says which views
    to drop and changes nothing; without them it goes on."""
    prefix = "coll_view_"
    engine = sa.create_engine(language_collated_url)
    with engine.connect() as conn:
        command.upgrade(config(prefix, connection=conn), "0002")
        conn.exec_driver_sql(
            f"CREATE VIEW {prefix}active AS SELECT state_id, name FROM {prefix}states"
        )
        conn.exec_driver_sql(f"CREATE VIEW {prefix}log AS SELECT actor FROM {prefix}history")
        conn.commit()
    _register_type()
    app = _app(
        tmp_path,
        "postgres",
        STATEMANAGER_DATABASE_URI=language_collated_url,
        STATEMANAGER_TABLE_PREFIX=prefix,
    )
    result = app.test_cli_runner().invoke(args=["states", "upgrade-db"])
    assert result.exit_code != 0
    assert f"{prefix}active, {prefix}log" in result.output
    assert "Drop them" in result.output
    assert set(_collations(language_collated_url, prefix)["columns"].values()) == {"default"}
    with engine.connect() as conn:
        conn.exec_driver_sql(f"DROP VIEW {prefix}active")
        conn.exec_driver_sql(f"DROP VIEW {prefix}log")
        conn.commit()
    engine.dispose()
    result = app.test_cli_runner().invoke(args=["states", "upgrade-db"])
    assert result.exit_code == 0, result.output
    assert _collations(language_collated_url, prefix)["columns"] == _all_c(prefix)
