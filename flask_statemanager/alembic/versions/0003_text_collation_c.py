"""Text columns compare by code point on PostgreSQL: ``COLLATE "C"``.

PostgreSQL ordered ``state_id``, ``name``, ``type`` and ``status`` (search
order, range filters, keyset paging) by the database's default collation,
where ``en_US.UTF-8`` puts ``'a'`` before ``'B'``; the memory, SQLite and Redis
stores compare by code point. Every text column of both tables now has
``COLLATE "C"``, as ``stores/sql_tables.py`` declares: the history's
``state_id`` too, since it is joined with the states'.

One ``ALTER TABLE`` per table: the rows are not rewritten (the type stays
the same), but every index on an altered column is rebuilt, once, under an
``ACCESS EXCLUSIVE`` lock — including the declared field indexes
``(type, <JSON expression>, state_id)``, which PostgreSQL rebuilds with the
columns' new collation. Nothing to do on SQLite, which compares text
byte by byte (``BINARY``) already.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

from flask_statemanager.alembic import table_prefix
from flask_statemanager.errors import ConfigurationError

revision = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None

#: The text columns of each table and their lengths (frozen copy of sql_tables).
COLUMNS = {
    "states": {"state_id": 255, "type": 64, "name": 255, "status": 64},
    "history": {"change_id": 36, "state_id": 255, "transition": 64, "actor": 255, "hash": 64},
}


def upgrade() -> None:
    _collate('"C"')


def downgrade() -> None:
    _collate('"default"')


def _collate(collation: str) -> None:
    context = op.get_context()
    if context.dialect.name != "postgresql":
        return
    quote = context.dialect.identifier_preparer.quote
    prefix = table_prefix()
    if not context.as_sql:  # --sql prints the statements: nothing to ask the database
        _refuse_dependent_views(prefix, quote)
    for table, columns in COLUMNS.items():
        alters = ", ".join(
            f"ALTER COLUMN {quote(name)} TYPE VARCHAR({length}) COLLATE {collation}"
            for name, length in columns.items()
        )
        op.execute(f"ALTER TABLE {quote(prefix + table)} {alters}")


def _refuse_dependent_views(prefix: str, quote: Callable[[str], str]) -> None:
    """Raise, naming them, if views or rules use the columns: PostgreSQL cannot
    change a column's collation under them."""
    found: list[str] = []
    for table, columns in COLUMNS.items():
        found += (
            op.get_bind()
            .execute(
                sa.text(
                    "SELECT DISTINCT view.oid::regclass::text FROM pg_depend AS dep "
                    "JOIN pg_rewrite AS rule ON rule.oid = dep.objid "
                    "JOIN pg_class AS view ON view.oid = rule.ev_class "
                    "JOIN pg_attribute AS col "
                    "ON col.attrelid = dep.refobjid AND col.attnum = dep.refobjsubid "
                    "WHERE dep.classid = 'pg_rewrite'::regclass "
                    "AND dep.refclassid = 'pg_class'::regclass "
                    "AND dep.refobjid = to_regclass(:table) AND view.oid <> dep.refobjid "
                    "AND col.attname = ANY(:columns)"
                ),
                {"table": quote(prefix + table), "columns": list(columns)},
            )
            .scalars()
        )
    if found:
        names = ", ".join(sorted(set(found)))
        raise ConfigurationError(
            f'Revision 0003 collates the text columns of the {prefix}* tables "C", which '
            f"PostgreSQL cannot do while views or rules use them: {names}. Drop them, run "
            "`flask states upgrade-db`, then create them again (nothing was changed)."
        )
