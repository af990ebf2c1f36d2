"""SQL store: SQLite (WAL) and PostgreSQL (JSONB, psycopg 3) through SQLAlchemy 2.

Two tables (:mod:`.sql_tables`): ``<prefix>states``, one row per state with
deleted ones kept as tombstones, and ``<prefix>history``, one row per committed
change, unique on ``(state_id, version)``.

A write is one transaction: read the rows under a lock (``SELECT … FOR
UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), let the engine plan,
then per state a compare-and-set ``UPDATE … WHERE state_id = ? AND version =
?`` (or an ``INSERT`` for a new id) and the history ``INSERT``. Reads of one
or many states and writes run hand-compiled statements (:mod:`.sql_statements`)
on the pool's connections; search, history and maintenance use SQLAlchemy Core,
with JSON filters compiled by :mod:`.sql_json` to match the declared
expression indexes ``(type, <json expression>, state_id)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.schema import CreateIndex
from sqlalchemy.sql.elements import ColumnElement

from ..definitions import DELETED, EXPIRED, TypeDefinition
from ..errors import BackendUnavailableError
from ..query import Condition, Query
from ..records import CHANGE_KEYS, STATE_COLUMNS, Change, State
from .base import Plan, Store, VersionMismatch, Write
from .sql_json import column_name, compare, json_dialect
from .sql_statements import Statements
from .sql_tables import index_name, make_tables

if TYPE_CHECKING:
    from ..alembic import SchemaUpgrade


class SQLStore(Store):
    """States and history in two SQL tables."""

    kind = "sql"

    def __init__(
        self, engine: Engine, *, table_prefix: str = "statemanager_", owns_engine: bool = False
    ) -> None:
        self.engine = engine
        self.prefix = table_prefix
        self._owns_engine = owns_engine
        self.dialect = engine.dialect.name
        self.embedded = self.dialect == "sqlite"
        self._dbapi_errors = engine.dialect.loaded_dbapi
        # Reads are single statements: autocommit spares BEGIN and the ROLLBACK
        # on return to the pool (two round trips on PostgreSQL).
        self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.metadata, self.states, self.history_table = make_tables(table_prefix)
        self._json = json_dialect(self.dialect)
        self._sql = Statements(engine.dialect, self.states, self.history_table)
        self._state_columns = [
            self.states.c[k if k != "metadata" else "meta"] for k in STATE_COLUMNS
        ]
        h = self.history_table
        self._change_columns = [h.c[k if k != "metadata" else "meta"] for k in CHANGE_KEYS]

    # -- schema -------------------------------------------------------------

    def setup(self, types: Iterable[TypeDefinition]) -> None:
        """Migrate the tables to the newest revision, then create every declared index.

        Declared indexes come from ``register_type(indexes=...)`` at run time,
        so they are not part of the Alembic migrations.
        """
        self.upgrade_schema()
        with self._connect(self.engine) as conn:
            for field in sorted({f for t in types for f in t.indexes}):
                conn.execute(CreateIndex(self._declared_index(field), if_not_exists=True))
            conn.commit()

    def upgrade_schema(self, *, sql: TextIO | None = None) -> SchemaUpgrade:
        """Run the package's Alembic migrations of the two tables up to the newest revision.

        :param sql: write the SQL to this stream instead of running it.
        """
        from ..alembic import upgrade

        with self._connect(self.engine) as conn:
            return upgrade(conn, self.prefix, sql=sql)

    def schema_revision(self) -> str | None:
        """The revision of the tables recorded in the database, ``None`` if none."""
        from ..alembic import current_revision, version_table

        with self._connect(self.engine) as conn:
            if not sa.inspect(conn).has_table(version_table(self.prefix)):
                return None
            return current_revision(conn, self.prefix)

    def _declared_index(self, field: str) -> sa.Index:
        root, _, rest = field.partition(".")
        expr = self._json.value(column_name(root), tuple(rest.split(".")))
        return sa.Index(
            index_name(self.prefix, field), self.states.c.type, expr, self.states.c.state_id
        )

    # -- connections ------------------------------------------------------------

    @contextmanager
    def _connect(self, engine: Engine | None = None) -> Iterator[Connection]:
        """A SQLAlchemy connection, autocommit unless another *engine* is given."""
        try:
            with (engine or self._reader).connect() as conn:
                yield conn
        except sa.exc.OperationalError as exc:
            raise self._unavailable(exc) from exc

    @contextmanager
    def _raw(self) -> Iterator[Any]:
        """A pooled DBAPI connection in autocommit mode; writes say BEGIN themselves.

        Autocommit spares a single-statement read the BEGIN and the ROLLBACK on
        return to the pool. A connection the server dropped (a restart, an idle
        timeout) is discarded with every other pooled one, which are as dead,
        and reported as :class:`_Stale` so callers can run once more.
        """
        try:
            fairy = self.engine.raw_connection()
        except (sa.exc.DBAPIError, self._dbapi_errors.Error) as exc:
            raise self._unavailable(exc) from exc
        raw: Any = fairy.dbapi_connection
        # sqlite3 already leaves statements alone until told BEGIN (outside DML).
        # The pool may be the application's: hand the connection back as it came.
        previous = raw.autocommit if self._sql.postgres else None
        try:
            if previous is False:
                raw.autocommit = True
            yield raw
            if previous is False:
                raw.autocommit = False
        except (self._dbapi_errors.OperationalError, self._dbapi_errors.InterfaceError) as exc:
            fairy.invalidate(exc)
            if getattr(raw, "broken", False):
                self.engine.dispose(close=False)
                raise _Stale(str(self._unavailable(exc)), backend="sql") from exc
            raise self._unavailable(exc) from exc
        finally:
            fairy.close()

    def _unavailable(self, exc: Exception) -> BackendUnavailableError:
        # The driver's first line only: never a connection string or password.
        orig = getattr(exc, "orig", None) or exc
        reason = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        return BackendUnavailableError(
            f"The {self.dialect} database is unavailable: {reason}", backend="sql"
        )

    # -- reads --------------------------------------------------------------

    def _read(self, statement: str, params: dict[str, Any]) -> list[Any]:
        """Run one read; once more on a fresh connection if the pooled one was dead."""
        try:
            with self._raw() as raw:
                return raw.execute(statement, params).fetchall()  # type: ignore[no-any-return]
        except _Stale:
            with self._raw() as raw:
                return raw.execute(statement, params).fetchall()  # type: ignore[no-any-return]

    def get(self, state_id: str) -> State | None:
        rows = self._read(self._sql.select_one, {"state_id": state_id})
        return self._sql.state(rows[0]) if rows else None

    def get_many(self, state_ids: Sequence[str]) -> dict[str, State]:
        if not state_ids:
            return {}
        rows = self._read(self._sql.select_many, self._sql.ids(state_ids))
        return {row[0]: self._sql.state(row) for row in rows}

    def query(self, query: Query) -> tuple[list[State], int]:
        states = self.states
        where: list[ColumnElement[bool]] = [
            states.c.status.not_in([DELETED, EXPIRED]),
            sa.or_(states.c.expires_at.is_(None), states.c.expires_at > query.now),
        ]
        if query.type is not None:
            where.insert(0, states.c.type == query.type)
        where.extend(self._condition(c) for c in query.conditions)
        # Order by the column, then state_id so pages never overlap. Only
        # expires_at can be NULL (sorted last, as in the memory store); plain
        # keys let a declared index (type, field, state_id) deliver the order.
        order_column = states.c[query.order.root]
        order = [order_column.desc() if query.order.descending else order_column.asc()]
        if order_column.nullable:
            order = [order[0].nulls_last()]
        if query.order.root != "state_id":
            order.append(
                states.c.state_id.desc() if query.order.descending else states.c.state_id.asc()
            )
        page = (
            sa.select(*self._state_columns)
            .where(*where)
            .order_by(*order)
            .offset(query.offset)
            .limit(query.limit)
        )
        with self._connect() as conn, self._custom_plans(conn):
            rows = conn.execute(page).all()
            # A short first page is the whole result: skip the COUNT.
            if query.offset == 0 and len(rows) < query.limit:
                count = len(rows)
            else:
                total = sa.select(sa.func.count()).select_from(states).where(*where)
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
        return compare(column, c.op, c.value)

    def history(self, state_id: str, transition: str | None = None) -> list[Change]:
        h = self.history_table
        stmt = sa.select(*self._change_columns).where(h.c.state_id == state_id)
        if transition is not None:
            stmt = stmt.where(h.c.transition == transition)
        with self._connect() as conn:
            rows = conn.execute(stmt.order_by(h.c.version)).all()
        return [_change(r) for r in rows]

    def state_ids(self, after: str | None, limit: int) -> list[str]:
        s = self.states
        stmt = sa.select(s.c.state_id).order_by(s.c.state_id).limit(limit)
        if after is not None:
            stmt = stmt.where(s.c.state_id > after)
        with self._connect() as conn:
            return list(conn.execute(stmt).scalars())

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
        try:
            return self._transaction(state_ids, plan)
        except _Stale as stale:
            if stale.wrote:
                raise  # it may have committed: never send it twice
            return self._transaction(state_ids, plan)

    def _transaction(self, state_ids: Sequence[str], plan: Plan) -> Sequence[Write]:
        sql = self._sql
        wrote = False
        try:
            with self._raw() as raw:
                try:
                    with self._pipeline(raw) as flush:
                        # SQLite: take the write lock now, not at the first UPDATE,
                        # where a reader upgrading could fail instead of waiting.
                        raw.execute("BEGIN" if sql.postgres else "BEGIN IMMEDIATE")
                        rows = raw.execute(sql.select_locked, sql.ids(state_ids)).fetchall()
                        found = {row[0]: sql.state(row) for row in rows}
                        heads = {row[0]: row[-1] for row in rows}
                        writes = plan(
                            {i: found.get(i) for i in state_ids},
                            {i: heads.get(i) for i in state_ids},
                        )
                        wrote = True
                        checks = []
                        for write in writes:
                            for statement, params, counted in sql.write(write):
                                cursor = raw.execute(statement, params)
                                if counted:
                                    checks.append((cursor, write.state["state_id"]))
                        # On PostgreSQL one write is a single statement that writes
                        # nothing if its compare-and-set lost, so COMMIT goes in the
                        # same round trip; otherwise check every write first.
                        if not (sql.postgres and len(writes) == 1):
                            flush()
                            _check(checks)
                        raw.execute("COMMIT")
                    _check(checks)
                except self._dbapi_errors.IntegrityError as exc:
                    # Two writers raced to insert the same new id: the loser rolls back.
                    raw.execute("ROLLBACK")
                    raise VersionMismatch(state_ids[0], None) from exc
                except BaseException:
                    if raw.info.transaction_status if sql.postgres else raw.in_transaction:
                        raw.execute("ROLLBACK")
                    raise
        except _Stale as stale:
            stale.wrote = wrote
            raise
        return writes

    @contextmanager
    def _pipeline(self, raw: Any) -> Iterator[Callable[[], None]]:
        """On PostgreSQL, batch statements into few round trips (psycopg pipeline mode).

        BEGIN travels with the locking SELECT, the UPDATEs and INSERTs of a batch
        together, and COMMIT alone: three round trips for any number of states.
        Yields the function that sends what is queued and waits for the results,
        so compare-and-set row counts are checked before COMMIT. SQLite runs
        in-process: nothing to batch.
        """
        if not self._sql.postgres:
            yield lambda: None
            return
        with raw.pipeline() as pipeline:
            yield pipeline.sync

    def reset(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.history_table.delete())
            conn.execute(self.states.delete())

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()


class _Stale(BackendUnavailableError):
    """The pooled connection turned out dead (the server restarted or dropped it)."""

    #: Whether a write had been sent: if so it may have committed, so no retry.
    wrote = False


def _check(executed: Sequence[tuple[Any, str]]) -> None:
    for cursor, state_id in executed:
        if cursor.rowcount != 1:
            raise VersionMismatch(state_id, None)


def _state(row: Any) -> State:
    return State.from_columns(*row)


def _change(row: Any) -> Change:
    return Change(zip(CHANGE_KEYS, row, strict=True))
