"""Add the history table's ``hash`` column (the tamper-evident chain, see audit.py).

Entries written before this revision keep a NULL hash; ``flask states verify``
reports them as written before sealing.

Tables made by ``create_all`` after the column entered the model but before
migrations existed already have it: they are stamped at 0001 like older ones,
so the column is added only where it is missing.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from flask_statemanager.alembic import table_prefix

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    prefix = table_prefix()
    history = f"{prefix}history"
    if not context.is_offline_mode():
        columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns(history)}
        if "hash" in columns:
            return
    op.add_column(history, sa.Column("hash", sa.String(length=64), nullable=True))


def downgrade() -> None:
    prefix = table_prefix()
    with op.batch_alter_table(f"{prefix}history") as batch:
        batch.drop_column("hash")
