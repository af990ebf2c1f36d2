"""Create the states and history tables (the schema of flask-statemanager 0.1).

Exactly what ``metadata.create_all`` made from ``stores/sql_tables.py`` before
migrations existed, so databases made that way are stamped here.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from flask_statemanager.alembic import table_prefix

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None

# Frozen copies of sql_tables' dialect-switching types: JSONB or text, and
# timestamps with time zone (naive UTC text on SQLite).
JSON = sa.Text().with_variant(postgresql.JSONB(), "postgresql")
TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    prefix = table_prefix()
    op.create_table(
        f"{prefix}states",
        sa.Column("state_id", sa.String(255), primary_key=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("status", sa.String(64), nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("updated_at", TIME, nullable=False),
        sa.Column("expires_at", TIME, nullable=True),
    )
    states = f"{prefix}states"
    op.create_index(f"ix_{prefix}states_type_updated", states, ["type", "updated_at", "state_id"])
    op.create_index(f"ix_{prefix}states_type_status", states, ["type", "status"])
    op.create_index(f"ix_{prefix}states_expires_at", states, ["expires_at"])
    op.create_table(
        f"{prefix}history",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("change_id", sa.String(36), nullable=False),
        sa.Column("state_id", sa.String(255), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("transition", sa.String(64), nullable=False),
        sa.Column("old_data", JSON, nullable=True),
        sa.Column("new_data", JSON, nullable=True),
        sa.Column("actor", sa.String(255), nullable=True),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.UniqueConstraint("state_id", "version", name=f"uq_{prefix}history_state_version"),
    )


def downgrade() -> None:
    prefix = table_prefix()
    op.drop_table(f"{prefix}history")
    op.drop_table(f"{prefix}states")
