"""The Alembic migrations of the package's tables, on SQLite and PostgreSQL.

The migrated schema must equal what ``metadata.create_all`` makes from
``stores/sql_tables.py``; ``flask states init-db`` / ``upgrade-db`` migrate,
adopt tables made before migrations, and stay out of an application's
Flask-Migrate history (tested with the real ``flask db`` commands).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from flask_statemanager import ConfigurationError, StateManager
from flask_statemanager.alembic import (
    BASELINE,
    config,
    head_revision,
    include_name,
    owned_tables,
    upgrade,
    version_table,
)
from flask_statemanager.stores.sql_tables import make_tables

from .conftest import make_app

PREFIXES = ("mig_a_", "mig_b_", "mig_c_", "mig_d_")


def _psycopg(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL with none of this module's tables in it."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.sqlite3'}"
        return
    url = _psycopg(request.getfixturevalue("postgres_url"))
    _drop_all(url)
    yield url
    _drop_all(url)


def _drop_all(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for prefix in PREFIXES:
            for table in ("history", "states", "alembic_version"):
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {prefix}{table}")
    engine.dispose()


@pytest.fixture
def engine(database: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(database)
    yield engine
    engine.dispose()


def _schema(conn: sa.Connection, prefix: str) -> dict[str, Any]:
    """Everything the inspector sees of the two tables, with the prefix replaced by ``P_``."""
    inspector = sa.inspect(conn)

    def name(value: Any) -> Any:
        return value.replace(prefix, "P_") if isinstance(value, str) else value

    schema: dict[str, Any] = {}
    for table in ("states", "history"):
        full = prefix + table
        pk = inspector.get_pk_constraint(full)
        schema[table] = {
            # By name: a later revision's ALTER TABLE appends, create_all follows the model.
            "columns": sorted(
                (
                    c["name"],
                    str(c["type"]),
                    c["nullable"],
                    name(c.get("default")),
                    c.get("autoincrement"),
                )
                for c in inspector.get_columns(full)
            ),
            "primary_key": (name(pk.get("name")), pk["constrained_columns"]),
            "indexes": sorted(
                (name(i["name"]), tuple(i["column_names"]), bool(i["unique"]))
                for i in inspector.get_indexes(full)
            ),
            "unique": sorted(
                (name(u["name"]), tuple(u["column_names"]))
                for u in inspector.get_unique_constraints(full)
            ),
            "foreign_keys": inspector.get_foreign_keys(full),
            "checks": inspector.get_check_constraints(full),
        }
    return schema


def test_migrated_schema_equals_create_all(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        make_tables("mig_a_")[0].create_all(conn)
        conn.commit()
        upgrade(conn, "mig_b_")
        modelled, migrated = _schema(conn, "mig_a_"), _schema(conn, "mig_b_")
        assert migrated == modelled
        assert {"id", "change_id", "old_data"} <= {c[0] for c in migrated["history"]["columns"]}
        assert len(migrated["states"]["indexes"]) == 3
        # Alembic's own comparison (what autogenerate would write) finds nothing to do.
        context = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "include_name": lambda name, type_, _: (
                    type_ != "table" or name in owned_tables("mig_b_")
                ),
            },
        )
        differences = compare_metadata(context, make_tables("mig_b_")[0])
        assert [d for d in differences if "alembic_version" not in str(d)] == []


def test_upgrade_records_head_in_its_own_version_table(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        result = upgrade(conn, "mig_a_")
        assert (result.before, result.after, result.adopted) == (None, head_revision(), False)
        rows = conn.execute(sa.text("SELECT version_num FROM mig_a_alembic_version")).all()
        assert rows == [(head_revision(),)]
        tables = set(sa.inspect(conn).get_table_names())
        assert {"mig_a_states", "mig_a_history", "mig_a_alembic_version"} <= tables
        assert "alembic_version" not in tables  # an application's Flask-Migrate table
        again = upgrade(conn, "mig_a_")
        assert (again.before, again.after) == (head_revision(), head_revision())


def test_tables_made_before_migrations_are_adopted_not_recreated(
    tmp_path: Path, database: str
) -> None:
    engine = sa.create_engine(database)
    with engine.connect() as conn:
        _tables_before_migrations(conn, "mig_c_")
        conn.execute(make_tables("mig_c_")[1].insert(), [_row("legacy")])
        conn.commit()
    engine.dispose()
    manager = StateManager()
    app = make_app(tmp_path, STATEMANAGER_DATABASE_URI=database, STATEMANAGER_TABLE_PREFIX="mig_c_")
    manager.init_app(app)
    result = app.test_cli_runner().invoke(args=["states", "upgrade-db"])
    assert result.exit_code == 0, result.output
    if database.startswith("sqlite"):
        # init_app already migrated the SQLite file: it adopted the tables.
        assert f"Already at the newest revision, {head_revision()}" in result.output
    else:
        assert f"stamped at revision {BASELINE}" in result.output
    with app.app_context():
        state = manager.get_state("legacy")
        assert state is not None and state["data"] == {"kept": True}
        manager.update_state("legacy", {"data": {"kept": "still"}})
        assert [c["transition"] for c in manager.get_state_history("legacy")] == ["update"]
    engine = sa.create_engine(database)
    with engine.connect() as conn:
        revision = conn.execute(sa.text("SELECT version_num FROM mig_c_alembic_version"))
        assert revision.scalar_one() == head_revision()
    engine.dispose()


def _tables_before_migrations(conn: sa.Connection, prefix: str) -> None:
    """The tables as ``create_all`` made them before migrations: the baseline, unversioned."""
    command.upgrade(config(prefix, connection=conn), BASELINE)
    conn.exec_driver_sql(f"DROP TABLE {version_table(prefix)}")
    conn.commit()


def _row(state_id: str) -> dict[str, Any]:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    return {
        "state_id": state_id,
        "type": "user",
        "name": "user_state",
        "status": "active",
        "data": {"kept": True},
        "meta": {"version": "1.0"},
        "version": 1,
        "created_at": now,
        "updated_at": now,
        "expires_at": None,
    }


def test_tables_made_with_the_hash_column_before_migrations_upgrade(engine: sa.Engine) -> None:
    """The hash column entered the model before migrations: such tables have it already."""
    with engine.connect() as conn:
        _tables_before_migrations(conn, "mig_a_")
        conn.execute(sa.text("ALTER TABLE mig_a_history ADD COLUMN hash VARCHAR(64)"))
        conn.commit()
        result = upgrade(conn, "mig_a_")
        assert (result.before, result.after, result.adopted) == (BASELINE, head_revision(), True)
        columns = [c["name"] for c in sa.inspect(conn).get_columns("mig_a_history")]
        assert columns.count("hash") == 1


def test_revisions_downgrade_to_the_baseline_and_upgrade_again(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        upgrade(conn, "mig_b_")
        command.downgrade(config("mig_b_", connection=conn), BASELINE)
        conn.commit()
        columns = {c["name"] for c in sa.inspect(conn).get_columns("mig_b_history")}
        assert "hash" not in columns and "change_id" in columns
        assert upgrade(conn, "mig_b_").before == BASELINE
        modelled = make_tables("mig_b_")[2]
        columns = {c["name"] for c in sa.inspect(conn).get_columns("mig_b_history")}
        assert columns == {c.name for c in modelled.columns}


def test_a_version_table_without_its_tables_migrates_from_the_start(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        upgrade(conn, "mig_a_")
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE mig_a_history")
        conn.exec_driver_sql("DROP TABLE mig_a_states")
    with engine.connect() as conn:
        result = upgrade(conn, "mig_a_")
        assert (result.before, result.after) == (None, head_revision())
        assert sa.inspect(conn).has_table("mig_a_states")
        rows = conn.execute(sa.text("SELECT version_num FROM mig_a_alembic_version")).all()
        assert rows == [(head_revision(),)]


def test_a_revision_from_a_newer_package_is_a_clear_error(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        upgrade(conn, "mig_a_")
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE mig_a_alembic_version SET version_num = '9999'")
    with engine.connect() as conn, pytest.raises(ConfigurationError, match="'9999'.*not know"):
        upgrade(conn, "mig_a_")


def test_concurrent_upgrades_migrate_once(engine: sa.Engine) -> None:
    """Processes starting together (workers, init-db in a deploy) wait for each other."""
    results: list[Any] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def migrate() -> None:
        try:
            with engine.connect() as conn:
                barrier.wait()
                results.append(upgrade(conn, "mig_d_"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(r.before is None for r in results) == [False, False, False, True]
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT version_num FROM mig_d_alembic_version")).all()
    assert rows == [(head_revision(),)]


def test_upgrade_db_shows_revisions_and_sql(tmp_path: Path, postgres_url: str) -> None:
    url = _psycopg(postgres_url)
    _drop_all(url)
    manager = StateManager()
    app = make_app(tmp_path, STATEMANAGER_DATABASE_URI=url, STATEMANAGER_TABLE_PREFIX="mig_a_")
    manager.init_app(app)
    runner = app.test_cli_runner()
    engine = sa.create_engine(url)
    try:
        printed = runner.invoke(args=["states", "upgrade-db", "--sql"])
        assert printed.exit_code == 0, printed.output
        assert "CREATE TABLE mig_a_states" in printed.output
        assert "data JSONB NOT NULL" in printed.output
        assert "INSERT INTO mig_a_alembic_version" in printed.output
        assert not sa.inspect(engine).has_table("mig_a_states")  # printed, not run

        first = runner.invoke(args=["states", "upgrade-db"])
        assert first.exit_code == 0, first.output
        assert f"Upgraded the tables: none -> {head_revision()}." in first.output
        assert sa.inspect(engine).has_table("mig_a_states")
        second = runner.invoke(args=["states", "upgrade-db"])
        assert second.output.strip() == f"Already at the newest revision, {head_revision()}."
        nothing = runner.invoke(args=["states", "upgrade-db", "--sql"])
        assert nothing.output.strip() == f"-- Already at revision {head_revision()}."

        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE mig_a_alembic_version SET version_num = 'abc123'")
        unknown = runner.invoke(args=["states", "upgrade-db"])
        assert unknown.exit_code != 0
        assert "revision 'abc123'" in unknown.output and "does not know" in unknown.output
    finally:
        engine.dispose()
        _drop_all(url)


def test_init_db_migrates_then_creates_declared_indexes(tmp_path: Path, postgres_url: str) -> None:
    url = _psycopg(postgres_url)
    _drop_all(url)
    manager = StateManager()
    manager.register_type("user", indexes=["data.plan"])
    app = make_app(tmp_path, STATEMANAGER_DATABASE_URI=url, STATEMANAGER_TABLE_PREFIX="mig_b_")
    manager.init_app(app)
    engine = sa.create_engine(url)
    try:
        assert not sa.inspect(engine).has_table("mig_b_states")  # no DDL at start-up on a server
        result = app.test_cli_runner().invoke(args=["states", "init-db"])
        assert result.exit_code == 0, result.output
        assert f"Tables at revision {head_revision()}." in result.output
        indexes = {i["name"] for i in sa.inspect(engine).get_indexes("mig_b_states")}
        assert "ix_mig_b_states_data_plan" in indexes
        # The declared index is not Alembic's: the schema still matches the revisions.
        with engine.connect() as conn:
            schema = _schema(conn, "mig_b_")
        assert "ix_P_states_data_plan" in {i[0] for i in schema["states"]["indexes"]}
    finally:
        engine.dispose()
        _drop_all(url)


def test_sqlite_init_app_migrates_and_memory_has_nothing_to_upgrade(tmp_path: Path) -> None:
    manager = StateManager()
    app = make_app(tmp_path)
    manager.init_app(app)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'instance' / 'statemanager.sqlite3'}")
    with engine.connect() as conn:
        revision = conn.execute(sa.text("SELECT version_num FROM statemanager_alembic_version"))
        assert revision.scalar_one() == head_revision()
    engine.dispose()

    memory = make_app(tmp_path / "memory", STATEMANAGER_STORE="memory")
    manager.init_app(memory)
    result = memory.test_cli_runner().invoke(args=["states", "upgrade-db"])
    assert result.exit_code == 0
    assert "memory store has no SQL tables" in result.output


def test_include_name_hides_only_the_packages_tables(tmp_path: Path) -> None:
    assert not include_name("statemanager_states", "table", {})
    assert not include_name(version_table("statemanager_"), "table", {})
    assert include_name("alembic_version", "table", {})
    assert include_name("invoices", "table", {})
    assert include_name("ix_statemanager_states_type_status", "index", {})
    app = make_app(tmp_path, STATEMANAGER_TABLE_PREFIX="sm_")
    with app.app_context():
        assert not include_name("sm_history", "table", {})
        assert include_name("statemanager_history", "table", {})


# -- Flask-Migrate, for real ----------------------------------------------------

APP_MODULE = """
import os

from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy

from flask_statemanager import StateManager
from flask_statemanager.alembic import include_name

db = SQLAlchemy()
migrate = Migrate()
state_manager = StateManager.get_instance(database_manager=db)


class Invoice(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    number = db.Column(db.String(32), nullable=False)


def create_app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["APP_DATABASE_URL"]
    db.init_app(app)
    hooks = {"include_name": include_name} if os.environ.get("APP_HIDE_STATEMANAGER") else {}
    migrate.init_app(app, db, directory=os.environ["APP_MIGRATIONS"], **hooks)
    state_manager.init_app(app)
    return app
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def app_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database for a whole application (its own on PostgreSQL)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'app.sqlite3'}"
        return
    base = _psycopg(request.getfixturevalue("postgres_url"))
    name = sa.make_url(base).database + "_flask_migrate"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    yield sa.make_url(base).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.dispose()


def test_flask_migrate_app_sees_no_conflict(tmp_path: Path, app_database: str) -> None:
    (tmp_path / "invoicing.py").write_text(textwrap.dedent(APP_MODULE))
    env = {
        **os.environ,
        "FLASK_APP": "invoicing:create_app",
        "PYTHONPATH": str(tmp_path),
        "APP_DATABASE_URL": app_database,
        "APP_MIGRATIONS": str(tmp_path / "migrations"),
        "APP_HIDE_STATEMANAGER": "1",
    }

    def flask(*args: str, hide: bool = True) -> subprocess.CompletedProcess[str]:
        run_env = env if hide else {k: v for k, v in env.items() if k != "APP_HIDE_STATEMANAGER"}
        return subprocess.run(
            [sys.executable, "-m", "flask", *args],
            cwd=tmp_path,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def ok(*args: str) -> str:
        done = flask(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    assert "Tables and indexes ready" in ok("states", "init-db")
    ok("db", "init")
    ok("db", "migrate", "-m", "invoices")
    [script] = (tmp_path / "migrations" / "versions").glob("*.py")
    generated = script.read_text()
    assert "op.create_table('invoice'" in generated
    assert "statemanager" not in generated  # neither our tables nor our version table
    ok("db", "upgrade")
    assert "No new upgrade operations detected" in ok("db", "check")
    assert "Already at the newest revision" in ok("states", "upgrade-db")

    # Without the hook, autogenerate would propose dropping the package's tables.
    unhidden = flask("db", "check", hide=False)
    assert unhidden.returncode != 0
    assert "statemanager_states" in unhidden.stdout + unhidden.stderr

    engine = sa.create_engine(app_database)
    with engine.connect() as conn:
        app_revision = conn.execute(sa.text("SELECT version_num FROM alembic_version"))
        assert app_revision.scalar_one() in generated
        ours = conn.execute(sa.text("SELECT version_num FROM statemanager_alembic_version"))
        assert ours.scalar_one() == head_revision()
        assert {"invoice", "statemanager_states", "statemanager_history"} <= set(
            sa.inspect(conn).get_table_names()
        )
    engine.dispose()


def test_start_up_check_agrees_with_alembic_on_the_newest_revision() -> None:
    """Start-up reads the newest revision from file names (NNNN_slug.py), without Alembic."""
    from flask_statemanager.alembic import _newest_file

    assert _newest_file() == head_revision()
