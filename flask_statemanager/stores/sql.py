"""SQL store on SQLAlchemy 2 Core: SQLite (WAL) and PostgreSQL (JSONB, psycopg 3).

Two tables: ``<prefix>states`` (one row per state, deleted ones kept as
tombstones) and ``<prefix>history`` (one row per committed change, unique on
``(state_id, version)``). A write is one transaction: a compare-and-set
``UPDATE … WHERE state_id = ? AND version = ?`` (or an ``INSERT`` for a new
id) followed by the history ``INSERT``; a lost compare-and-set rolls the
transaction back.

Search compiles :class:`~flask_statemanager.query.Query` conditions to the
database's JSON operators. Fields a type declares as indexed get composite
expression indexes ``(type, <json expression>, state_id)``, built from the same
expression text the queries use, so the planner can match them.
"""

from __future__ import annotations

import hashlib
import operator
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.schema import CreateIndex
from sqlalchemy.sql.elements import ColumnElement

from .. import codec
from ..definitions import DELETED, EXPIRED, TypeDefinition
from ..errors import BackendUnavailableError
from ..query import Condition, Query
from ..records import CHANGE_KEYS, STATE_KEYS, Change, State
from .base import Plan, Store, VersionMismatch, Write


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
    """Timezone-aware UTC datetimes on every database (SQLite stores naive UTC)."""

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


def _tables(prefix: str) -> tuple[sa.MetaData, sa.Table, sa.Table]:
    metadata = sa.MetaData()
    states = sa.Table(
        f"{prefix}states",
        metadata,
        sa.Column("state_id", sa.String(255), primary_key=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("status", sa.String(64), nullable=False),
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
        sa.Column("change_id", sa.String(36), nullable=False),
        sa.Column("state_id", sa.String(255), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("transition", sa.String(64), nullable=False),
        sa.Column("old_data", JSONDocument(), nullable=True),
        sa.Column("new_data", JSONDocument(), nullable=True),
        sa.Column("actor", sa.String(255), nullable=True),
        sa.Column("metadata", JSONDocument(), nullable=False, key="meta"),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("state_id", "version", name=f"uq_{prefix}history_state_version"),
    )
    return metadata, states, history


# -- JSON expressions per dialect ------------------------------------------
#
# Paths are validated by query.split_field (letters, digits, underscores), so
# inlining them as literals is safe, and it is required: an expression index is
# only used when the query repeats its expression exactly.


class _JSONDialect(ABC):
    """How one database reads a value at a path inside a JSON column."""

    @abstractmethod
    def value(self, column: str, path: tuple[str, ...]) -> ColumnElement[Any]:
        """The expression for the value at *path*; declared indexes use it too."""

    @abstractmethod
    def condition(self, c: Condition) -> ColumnElement[bool]:
        """The SQL for one filter on a JSON path."""


class _PostgresJSON(_JSONDialect):
    """``data #> '{a,b}'`` is a jsonb value; jsonb equality is already type-aware."""

    def value(self, column: str, path: tuple[str, ...]) -> ColumnElement[Any]:
        return sa.literal_column(f"({column} #> '{{{','.join(path)}}}')", type_=JSONB)

    def _typeof(self, expr: ColumnElement[Any]) -> ColumnElement[Any]:
        return sa.func.jsonb_typeof(expr)

    def condition(self, c: Condition) -> ColumnElement[bool]:
        expr = self.value(_column_name(c.root), c.path)
        op, value = c.op, c.value
        if op == "exists":
            return expr.is_not(None) if value else expr.is_(None)
        if op == "eq":
            return expr == sa.bindparam(None, value, type_=JSONB)
        if op == "ne":
            return expr.is_distinct_from(sa.bindparam(None, value, type_=JSONB))
        if op == "in":
            return expr.in_([sa.bindparam(None, v, type_=JSONB) for v in value])
        if op == "contains":
            in_array = sa.and_(
                self._typeof(expr) == "array",
                expr.op("@>")(sa.bindparam(None, [value], type_=JSONB)),
            )
            if not isinstance(value, str):
                return in_array
            text = sa.literal_column(
                f"({_column_name(c.root)} #>> '{{{','.join(c.path)}}}')", type_=sa.Text
            )
            return sa.or_(
                in_array,
                sa.and_(self._typeof(expr) == "string", sa.func.strpos(text, value) > 0),
            )
        kind = "string" if isinstance(value, str) else "number"
        return sa.and_(
            _compare(expr, op, sa.bindparam(None, value, type_=JSONB)),
            self._typeof(expr) == kind,
        )


class _SQLiteJSON(_JSONDialect):
    """``json_extract`` gives SQL values; ``json_type`` tells JSON types apart."""

    def _path(self, path: tuple[str, ...]) -> str:
        return "$" + "".join(f'."{p}"' for p in path)

    def value(self, column: str, path: tuple[str, ...]) -> ColumnElement[Any]:
        return sa.literal_column(f"json_extract({column}, '{self._path(path)}')")

    def _type(self, column: str, path: tuple[str, ...]) -> ColumnElement[Any]:
        return sa.literal_column(f"json_type({column}, '{self._path(path)}')")

    def _kinds(self, value: Any) -> tuple[str, ...]:
        if value is True:
            return ("true",)
        if value is False:
            return ("false",)
        if value is None:
            return ("null",)
        if isinstance(value, str):
            return ("text",)
        return ("integer", "real")

    def _eq(self, column: str, path: tuple[str, ...], value: Any) -> ColumnElement[bool]:
        kinds = self._kinds(value)
        guard = self._type(column, path).in_(kinds)
        if value is None:
            return guard
        sql_value = int(value) if isinstance(value, bool) else value
        return sa.and_(self.value(column, path) == sql_value, guard)

    def condition(self, c: Condition) -> ColumnElement[bool]:
        column, path, op, value = _column_name(c.root), c.path, c.op, c.value
        if op == "exists":
            found = self._type(column, path)
            return found.is_not(None) if value else found.is_(None)
        if op == "eq":
            return self._eq(column, path, value)
        if op == "ne":
            return sa.not_(sa.func.coalesce(self._eq(column, path, value), False))
        if op == "in":
            return sa.or_(*(self._eq(column, path, v) for v in value))
        if op == "contains":
            listed = ", ".join(f"'{k}'" for k in self._kinds(value))
            item: ColumnElement[Any] = sa.bindparam(
                None, int(value) if isinstance(value, bool) else value
            )
            in_array = sa.and_(
                self._type(column, path) == "array",
                sa.exists(
                    sa.select(sa.literal(1))
                    .select_from(sa.text(f"json_each({column}, '{self._path(path)}') AS item"))
                    .where(
                        sa.text(f"item.type IN ({listed})"),
                        # JSON null has no SQL value to compare: its type says it all.
                        sa.true() if value is None else sa.literal_column("item.value") == item,
                    )
                ),
            )
            if not isinstance(value, str):
                return in_array
            return sa.or_(
                in_array,
                sa.and_(
                    self._type(column, path) == "text",
                    sa.func.instr(self.value(column, path), value) > 0,
                ),
            )
        kinds = ("text",) if isinstance(value, str) else ("integer", "real")
        return sa.and_(
            _compare(self.value(column, path), op, value),
            self._type(column, path).in_(kinds),
        )


def _column_name(root: str) -> str:
    return "metadata" if root == "metadata" else "data"


_COMPARISONS = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}


def _compare(expr: ColumnElement[Any], op: str, value: Any) -> ColumnElement[bool]:
    result: ColumnElement[bool] = _COMPARISONS[op](expr, value)
    return result


def _index_name(prefix: str, field: str) -> str:
    name = f"ix_{prefix}states_{field.replace('.', '_')}"
    if len(name) > 60:  # PostgreSQL truncates identifiers at 63 bytes
        digest = hashlib.sha1(field.encode()).hexdigest()[:8]
        name = f"{name[:51]}_{digest}"
    return name


class SQLStore(Store):
    """States and history in two SQL tables."""

    kind = "sql"

    def __init__(
        self, engine: Engine, *, table_prefix: str = "statemanager_", owns_engine: bool = False
    ) -> None:
        self.engine = engine
        self.prefix = table_prefix
        self._owns_engine = owns_engine
        self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.metadata, self.states, self.history_table = _tables(table_prefix)
        self.dialect = engine.dialect.name
        self.embedded = self.dialect == "sqlite"
        self._json: _JSONDialect = (
            _PostgresJSON() if self.dialect == "postgresql" else _SQLiteJSON()
        )
        states, history = self.states, self.history_table
        self._state_columns = [
            states.c[k if k != "metadata" else "meta"] for k in STATE_KEYS if k != "etag"
        ]
        self._select_one = sa.select(*self._state_columns).where(
            states.c.state_id == sa.bindparam("state_id")
        )
        self._select_many = sa.select(*self._state_columns).where(
            states.c.state_id.in_(sa.bindparam("ids", expanding=True))
        )
        # Rows a write reads, locked until commit on PostgreSQL (in id order, so
        # multi-state writes cannot deadlock); SQLite's BEGIN IMMEDIATE locks all.
        self._select_locked = (
            sa.select(*self._state_columns)
            .where(states.c.state_id.in_(sa.bindparam("ids", expanding=True)))
            .order_by(states.c.state_id)
        )
        if self.dialect == "postgresql":
            self._select_locked = self._select_locked.with_for_update()
        self._insert_state = states.insert()
        self._update_state = (
            states.update()
            .where(
                states.c.state_id == sa.bindparam("_state_id"),
                states.c.version == sa.bindparam("_expected"),
            )
            .values({c: sa.bindparam(c.key) for c in states.c if c.key != "state_id"})
        )
        self._insert_change = history.insert()
        self._change_columns = [history.c[k if k != "metadata" else "meta"] for k in CHANGE_KEYS]

    # -- schema -------------------------------------------------------------

    def setup(self, types: Iterable[TypeDefinition]) -> None:
        with self._connect(self.engine) as conn:
            self.metadata.create_all(conn, checkfirst=True)
            for field in sorted({f for t in types for f in t.indexes}):
                conn.execute(CreateIndex(self._declared_index(field), if_not_exists=True))
            conn.commit()

    def _declared_index(self, field: str) -> sa.Index:
        root, _, rest = field.partition(".")
        expr = self._json.value(_column_name(root), tuple(rest.split(".")))
        return sa.Index(
            _index_name(self.prefix, field), self.states.c.type, expr, self.states.c.state_id
        )

    def declared_index_names(self, types: Iterable[TypeDefinition]) -> list[str]:
        """Names of the expression indexes the given types declare."""
        return sorted({_index_name(self.prefix, f) for t in types for f in t.indexes})

    # -- reads --------------------------------------------------------------

    @contextmanager
    def _connect(self, engine: Engine | None = None) -> Iterator[Connection]:
        """A pooled connection; by default autocommit, for reads.

        Each read is a single statement, so it needs no transaction: autocommit
        spares the BEGIN and the ROLLBACK on return to the pool (two round trips
        on PostgreSQL).
        """
        try:
            with (engine or self._reader).connect() as conn:
                yield conn
        except OperationalError as exc:
            raise BackendUnavailableError(
                f"The {self.dialect} database is unavailable: {_reason(exc)}", backend="sql"
            ) from exc

    def get(self, state_id: str) -> State | None:
        with self._connect() as conn:
            row = conn.execute(self._select_one, {"state_id": state_id}).first()
        return None if row is None else _state(row)

    def get_many(self, state_ids: Sequence[str]) -> dict[str, State]:
        if not state_ids:
            return {}
        with self._connect() as conn:
            rows = conn.execute(self._select_many, {"ids": list(state_ids)}).all()
        return {row[0]: _state(row) for row in rows}

    def query(self, query: Query) -> tuple[list[State], int]:
        states = self.states
        where: list[ColumnElement[bool]] = [
            states.c.status.not_in([DELETED, EXPIRED]),
            sa.or_(states.c.expires_at.is_(None), states.c.expires_at > query.now),
        ]
        if query.type is not None:
            where.insert(0, states.c.type == query.type)
        for condition in query.conditions:
            where.append(self._condition(condition))
        order_column = states.c[query.order.root]
        if query.order.descending:
            order = [order_column.desc().nulls_last(), states.c.state_id.desc()]
        else:
            order = [order_column.asc().nulls_last(), states.c.state_id.asc()]
        page = (
            sa.select(*self._state_columns)
            .where(*where)
            .order_by(*order)
            .offset(query.offset)
            .limit(query.limit)
        )
        total = sa.select(sa.func.count()).select_from(states).where(*where)
        with self._connect() as conn, self._custom_plans(conn):
            rows = conn.execute(page).all()
            # A short first page is the whole result: skip the COUNT.
            if query.offset == 0 and len(rows) < query.limit:
                count = len(rows)
            else:
                count = conn.execute(total).scalar_one()
        return [_state(r) for r in rows], count

    @contextmanager
    def _custom_plans(self, conn: Connection) -> Iterator[None]:
        """Turn off psycopg's automatic prepared statements for this block.

        After five runs psycopg prepares a statement, and PostgreSQL then may
        switch to a generic plan that cannot see the filter value and ignores the
        expression index (measured 14x slower). Searches are planned per call.
        """
        if self.dialect != "postgresql":
            yield
            return
        raw: Any = conn.connection.dbapi_connection
        previous = raw.prepare_threshold
        raw.prepare_threshold = None
        try:
            yield
        finally:
            raw.prepare_threshold = previous

    def _condition(self, c: Condition) -> ColumnElement[bool]:
        if c.is_json:
            return self._json.condition(c)
        column: ColumnElement[Any] = self.states.c[c.root]
        if c.op in ("eq", "ne"):
            equal: ColumnElement[bool] = column.__eq__(c.value)
            return equal if c.op == "eq" else sa.not_(equal)
        if c.op == "in":
            return column.in_(list(c.value))
        if c.op == "contains":
            return column.contains(c.value, autoescape=True)
        return _compare(column, c.op, c.value)

    def history(self, state_id: str, transition: str | None = None) -> list[Change]:
        h = self.history_table
        stmt = sa.select(*self._change_columns).where(h.c.state_id == state_id)
        if transition is not None:
            stmt = stmt.where(h.c.transition == transition)
        with self._connect() as conn:
            rows = conn.execute(stmt.order_by(h.c.version)).all()
        return [_change(r) for r in rows]

    def recent_changes(self, state_id: str | None, limit: int) -> list[Change]:
        h = self.history_table
        stmt = sa.select(*self._change_columns)
        if state_id is None:
            stmt = stmt.order_by(h.c.id.desc())
        else:
            stmt = stmt.where(h.c.state_id == state_id).order_by(h.c.version.desc())
        with self._connect() as conn:
            rows = conn.execute(stmt.limit(limit)).all()
        return [_change(r) for r in rows]

    def expired(self, now: datetime, limit: int) -> list[State]:
        s = self.states
        stmt = (
            sa.select(*self._state_columns)
            .where(s.c.expires_at <= now, s.c.status.not_in([DELETED, EXPIRED]))
            .order_by(s.c.expires_at)
            .limit(limit)
        )
        with self._connect() as conn:
            return [_state(r) for r in conn.execute(stmt).all()]

    def count(self) -> int:
        stmt = (
            sa.select(sa.func.count())
            .select_from(self.states)
            .where(self.states.c.status.not_in([DELETED, EXPIRED]))
        )
        with self._connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def check(self) -> dict[str, Any]:
        with self._connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return {"component": self.dialect}

    # -- writes -------------------------------------------------------------

    def apply(self, state_ids: Sequence[str], plan: Plan) -> Sequence[Write]:
        """Lock the rows, plan, then compare-and-set and append history in one transaction.

        PostgreSQL locks the rows with ``SELECT … FOR UPDATE`` (in id order, so
        multi-state writes cannot deadlock); SQLite takes its single write lock
        up front with ``BEGIN IMMEDIATE``. Concurrent writers of a state queue
        for the lock instead of failing their compare-and-set.
        """
        try:
            with self.engine.begin() as conn:
                if self.dialect == "sqlite":
                    raw: Any = conn.connection.dbapi_connection
                    if not raw.in_transaction:
                        conn.exec_driver_sql("BEGIN IMMEDIATE")
                rows = conn.execute(self._select_locked, {"ids": sorted(state_ids)})
                found = {row[0]: _state(row) for row in rows}
                writes = plan({i: found.get(i) for i in state_ids})
                for write in writes:
                    self._write(conn, write)
                return writes
        except VersionMismatch:
            raise
        except IntegrityError as exc:
            # Two writers raced to insert the same new id: the loser rolled back.
            raise VersionMismatch(state_ids[0], None) from exc
        except DBAPIError as exc:
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                raise BackendUnavailableError(
                    f"The {self.dialect} database failed during a write: {_reason(exc)}",
                    backend="sql",
                ) from exc
            raise

    def _write(self, conn: Connection, write: Write) -> None:
        state = write.state
        values = {
            "type": state["type"],
            "name": state["name"],
            "status": state["status"],
            "data": state["data"],
            "meta": state["metadata"],
            "version": state["version"],
            "created_at": state["created_at"],
            "updated_at": state["updated_at"],
            "expires_at": state["expires_at"],
        }
        if write.expected_version == 0:
            conn.execute(self._insert_state, {"state_id": state["state_id"], **values})
        else:
            values["_state_id"] = state["state_id"]
            values["_expected"] = write.expected_version
            if conn.execute(self._update_state, values).rowcount != 1:
                row = conn.execute(self._select_one, {"state_id": state["state_id"]}).first()
                raise VersionMismatch(state["state_id"], row.version if row else None)
        change = write.change
        conn.execute(
            self._insert_change,
            {
                "change_id": change["change_id"],
                "state_id": change["state_id"],
                "version": change["version"],
                "transition": change["transition"],
                "old_data": change["old_data"],
                "new_data": change["new_data"],
                "actor": change["actor"],
                "meta": change["metadata"],
                "created_at": change["created_at"],
            },
        )

    def reset(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.history_table.delete())
            conn.execute(self.states.delete())

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()


def _state(row: Any) -> State:
    (state_id, name, type_, status, data, meta, version, created_at, updated_at, expires_at) = row
    return State(
        state_id=state_id,
        name=name,
        type=type_,
        status=status,
        data=data,
        metadata=meta,
        version=version,
        etag=str(version),
        created_at=created_at,
        updated_at=updated_at,
        expires_at=expires_at,
    )


def _change(row: Any) -> Change:
    return Change(zip(CHANGE_KEYS, row, strict=True))


def _reason(exc: Exception) -> str:
    # The driver message, first line only: never a connection string or password.
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
