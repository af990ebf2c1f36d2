"""Alembic migrations of the package's own tables, run without an ``alembic.ini``.

This folder is an Alembic script directory (``env.py``, ``script.py.mako``,
``versions/``) that ships inside the package, plus the functions that run it:
:func:`upgrade` (used by ``flask states init-db``, ``flask states
upgrade-db`` and SQLite's ``init_app``), :func:`current_revision` and
:func:`head_revision`. Revisions read the table prefix with
:func:`table_prefix`, so one set of scripts serves every
``STATEMANAGER_TABLE_PREFIX``.

The revision applied is recorded in a version table of its own,
``<prefix>alembic_version``, so an application's Flask-Migrate
``alembic_version`` is never touched; :func:`include_name` keeps the
application's ``flask db migrate`` from proposing to drop these tables.

The model the revisions must reproduce is :mod:`flask_statemanager.stores.sql_tables`
(a test compares the migrated schema with ``metadata.create_all``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import sqlalchemy as sa
from flask import current_app, has_app_context
from sqlalchemy.engine import Connection

from ..config import DEFAULTS
from ..errors import ConfigurationError
from ..stores.sql_tables import make_tables

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "BASELINE",
    "SCRIPT_LOCATION",
    "SchemaUpgrade",
    "config",
    "current_revision",
    "head_revision",
    "include_name",
    "owned_tables",
    "table_prefix",
    "upgrade",
    "version_table",
]

#: The Alembic script directory shipped with the package.
SCRIPT_LOCATION = str(Path(__file__).resolve().parent)

#: The revision that creates the tables as ``metadata.create_all`` made them
#: before migrations existed: databases without a version table are stamped here.
BASELINE = "0001"

_DEFAULT_PREFIX: str = DEFAULTS["STATEMANAGER_TABLE_PREFIX"]


@dataclass(frozen=True)
class SchemaUpgrade:
    """What :func:`upgrade` did."""

    #: The revision found: ``None`` for a database without the tables,
    #: :data:`BASELINE` for adopted ones.
    before: str | None
    #: The revision now recorded (the head).
    after: str
    #: The tables predated the version table and were stamped at :data:`BASELINE`.
    adopted: bool = False


def version_table(prefix: str) -> str:
    """The name of the table that records the applied revision for *prefix*."""
    return f"{prefix}alembic_version"


def table_prefix() -> str:
    """The table prefix of the migration being run; call it inside a revision's functions."""
    from alembic import context

    return str(context.config.attributes.get("table_prefix", _DEFAULT_PREFIX))


def config(
    prefix: str = _DEFAULT_PREFIX,
    *,
    connection: Connection | None = None,
    dialect_name: str | None = None,
    output: TextIO | None = None,
) -> Config:
    """An Alembic :class:`~alembic.config.Config` for the package's script directory.

    :param prefix: the ``STATEMANAGER_TABLE_PREFIX`` of the tables to migrate.
    :param connection: the connection to migrate (online mode).
    :param dialect_name: ``"sqlite"`` or ``"postgresql"``, for offline (``--sql``) mode.
    :param output: where offline mode writes the SQL.
    """
    from alembic.config import Config

    cfg = Config(output_buffer=output)
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    # New revisions are named 0002_<slug>.py (the revision id comes first).
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    # Generated revisions name tables with the prefix (registered in env.py).
    cfg.set_section_option("post_write_hooks", "hooks", "statemanager_prefix")
    cfg.set_section_option("post_write_hooks", "statemanager_prefix.type", "statemanager_prefix")
    cfg.attributes.update(
        table_prefix=prefix, connection=connection, dialect_name=dialect_name, output=output
    )
    return cfg


@functools.cache
def head_revision() -> str:
    """The newest revision shipped with the package."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(config()).get_current_head()
    assert head is not None  # the package ships at least BASELINE
    return head


def current_revision(connection: Connection, prefix: str = _DEFAULT_PREFIX) -> str | None:
    """The revision recorded in the database, ``None`` if there is none."""
    from alembic.runtime.migration import MigrationContext

    migration = MigrationContext.configure(
        connection, opts={"version_table": version_table(prefix)}
    )
    return migration.get_current_revision()


def upgrade(
    connection: Connection, prefix: str = _DEFAULT_PREFIX, *, sql: TextIO | None = None
) -> SchemaUpgrade:
    """Bring the tables of *prefix* to the newest revision; commits on *connection*.

    A database whose tables were made by ``metadata.create_all`` before the
    version table existed is stamped at :data:`BASELINE`, not re-created; one
    whose version table outlived its tables (dropped by hand) is migrated from
    the start. Concurrent callers are serialised (``BEGIN IMMEDIATE`` on
    SQLite, an advisory lock on PostgreSQL), so several processes starting at
    once migrate once.

    :param sql: write the SQL to this stream instead of running it (nothing is changed).
    :raises ConfigurationError: the database is at a revision this package does not know.
    """
    if sql is None and _at_newest(connection, prefix):
        return SchemaUpgrade(_newest_file(), _newest_file())
    from alembic import command

    _lock(connection, prefix)
    head = head_revision()
    tables = set(sa.inspect(connection).get_table_names())
    states = f"{prefix}states"
    found = current_revision(connection, prefix) if version_table(prefix) in tables else None
    adopt = found is None and states in tables
    stale = found is not None and states not in tables
    if found is not None and not stale:
        _check_known(found)
    # The revision the tables are really at: None means no tables.
    start = BASELINE if adopt else None if stale else found
    result = SchemaUpgrade(start, head, adopt)
    if sql is not None:
        connection.rollback()
        offline = config(prefix, dialect_name=connection.dialect.name, output=sql)
        if adopt:
            command.stamp(offline, BASELINE, sql=True)
        if start != head:
            command.upgrade(offline, f"{start}:head" if start else "head", sql=True)
        return result
    online = config(prefix, connection=connection)
    if adopt:
        command.stamp(online, BASELINE)
    elif stale:
        command.stamp(online, "base")
    if start != head:
        command.upgrade(online, "head")
    connection.commit()
    return result


def _at_newest(connection: Connection, prefix: str) -> bool:
    """Whether the tables are at the newest revision, read without loading Alembic.

    The check of every start-up of a SQLite app: importing Alembic costs ~0.1 s.
    """
    versions = sa.table(version_table(prefix), sa.column("version_num"))
    try:
        found = connection.execute(sa.select(versions.c.version_num)).scalars().all()
        # Fails if the tables were dropped while the version table stayed.
        connection.execute(sa.select(1).select_from(sa.table(f"{prefix}states")).limit(0))
    except sa.exc.DBAPIError:  # no version table yet; the full path looks closer
        found = []
    connection.rollback()
    return found == [_newest_file()]


@functools.cache
def _newest_file() -> str:
    """The newest revision by file name (``NNNN_slug.py``); a test checks Alembic agrees."""
    versions = Path(SCRIPT_LOCATION, "versions").glob("[0-9][0-9][0-9][0-9]_*.py")
    return max(path.name[:4] for path in versions)


def _lock(connection: Connection, prefix: str) -> None:
    """Start the transaction holding the lock every migrating process takes."""
    if connection.in_transaction():
        connection.commit()
    if connection.dialect.name == "sqlite":
        connection.begin()
        raw: Any = connection.connection.dbapi_connection
        if not raw.in_transaction:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif connection.dialect.name == "postgresql":
        connection.execute(
            sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
            {"key": version_table(prefix)},
        )


def _check_known(revision: str) -> None:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        ScriptDirectory.from_config(config()).get_revision(revision)
    except CommandError:
        raise ConfigurationError(
            f"The database's flask-statemanager tables are at revision {revision!r}, "
            "which this version of flask-statemanager does not know: install the "
            "version that made them, or a newer one."
        ) from None


def include_name(name: str | None, type_: str, parent_names: Mapping[str, str | None]) -> bool:
    """Alembic ``include_name`` hook that hides flask-statemanager's tables.

    Give it to Flask-Migrate (``Migrate(app, db, include_name=include_name)``)
    or to ``context.configure`` in an application's own ``env.py``: the
    application's ``autogenerate`` then neither reflects nor proposes to drop
    the states, history and version tables. The prefix is read from the
    current app's ``STATEMANAGER_TABLE_PREFIX``.
    """
    if type_ != "table" or name is None:
        return True
    prefix = _DEFAULT_PREFIX
    if has_app_context():
        prefix = current_app.config.get("STATEMANAGER_TABLE_PREFIX", _DEFAULT_PREFIX)
    return name not in owned_tables(prefix)


def owned_tables(prefix: str) -> frozenset[str]:
    """The names of every table the package owns under *prefix*, version table included."""
    metadata = make_tables(prefix)[0]
    return frozenset(metadata.tables) | {version_table(prefix)}
