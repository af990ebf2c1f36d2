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

from alembic import op

from flask_statemanager.alembic import table_prefix

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
    for table, columns in COLUMNS.items():
        alters = ", ".join(
            f"ALTER COLUMN {quote(name)} TYPE VARCHAR({length}) COLLATE {collation}"
            for name, length in columns.items()
        )
        op.execute(f"ALTER TABLE {quote(prefix + table)} {alters}")
