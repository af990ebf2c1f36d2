"""The SQL schema: the states and history tables and their column types.

Shared by the store, the hand-compiled hot-path statements and (later) the
Alembic migrations, so there is one definition of every table.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect

from .. import codec

#: The SQLite text format of timestamps (naive UTC, as SQLAlchemy writes them),
#: kept identical on every write path so string comparisons order correctly.
SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"

#: The collation of every text column on PostgreSQL, and of the JSON text that
#: string comparisons read (:mod:`.sql_json`): ``"C"`` compares by code point, as
#: Python, SQLite (``BINARY`` on UTF-8) and Redis do. The database's default
#: collation may be a language's (``en_US.UTF-8``: ``'a' < 'B' < 'b'``).
TEXT_COLLATION = "C"


def _text(length: int) -> sa.types.TypeEngine[str]:
    """A ``VARCHAR(length)``; ``COLLATE "C"`` on PostgreSQL (SQLite has no such collation).

    On the column, so its indexes (the primary key, ``(type, status)``, the
    declared ones) are ordered as the queries compare, and no query repeats it.
    """
    return sa.String(length).with_variant(sa.String(length, collation=TEXT_COLLATION), "postgresql")


class JSONDocument(sa.types.TypeDecorator[Any]):
    """JSONB on PostgreSQL; JSON text on SQLite, encoded with orjson."""

    impl = sa.Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(sa.Text())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None or dialect.name == "postgresql":
            return value
        return codec.dumps_str(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None or dialect.name == "postgresql":
            return value
        return codec.loads(value)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite stores naive UTC text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def make_tables(prefix: str) -> tuple[sa.MetaData, sa.Table, sa.Table]:
    metadata = sa.MetaData()
    states = sa.Table(
        f"{prefix}states",
        metadata,
        sa.Column("state_id", _text(255), primary_key=True),
        sa.Column("type", _text(64), nullable=False),
        sa.Column("name", _text(255), nullable=False),
        sa.Column("status", _text(64), nullable=False),
        sa.Column("data", JSONDocument(), nullable=False),
        sa.Column("metadata", JSONDocument(), nullable=False, key="meta"),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Index(f"ix_{prefix}states_type_updated", "type", "updated_at", "state_id"),
        sa.Index(f"ix_{prefix}states_type_status", "type", "status"),
        sa.Index(f"ix_{prefix}states_expires_at", "expires_at"),
    )
    history = sa.Table(
        f"{prefix}history",
        metadata,
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("change_id", _text(36), nullable=False),
        sa.Column("state_id", _text(255), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("transition", _text(64), nullable=False),
        sa.Column("old_data", JSONDocument(), nullable=True),
        sa.Column("new_data", JSONDocument(), nullable=True),
        sa.Column("actor", _text(255), nullable=True),
        sa.Column("metadata", JSONDocument(), nullable=False, key="meta"),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        # SHA-256 hex chained to the state's previous entry (see audit.py).
        sa.Column("hash", _text(64), nullable=True),
        sa.UniqueConstraint("state_id", "version", name=f"uq_{prefix}history_state_version"),
    )
    return metadata, states, history


def index_name(prefix: str, field: str) -> str:
    """The name of the declared expression index for *field* (at most 60 characters)."""
    name = f"ix_{prefix}states_{field.replace('.', '_')}"
    if len(name) > 60:  # PostgreSQL truncates identifiers at 63 bytes
        digest = hashlib.sha1(field.encode()).hexdigest()[:8]
        name = f"{name[:51]}_{digest}"
    return name
