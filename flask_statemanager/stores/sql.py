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

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, TextIO

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.schema import CreateIndex
from sqlalchemy.sql.elements import ColumnElement

from ..definitions import DELETED, EXPIRED, TypeDefinition
from ..errors import BackendUnavailableError, StateValidationError
from ..query import Condition, Query
from ..records import CHANGE_KEYS, STATE_COLUMNS, Change, State
from .base import (
    ChangeRewrite,
    LostRace,
    Plan,
    Pruned,
    Retention,
    StateRewrite,
    Store,
    Tally,
    VersionMismatch,
    Write,
    check_restore,
    restore_refused,
)
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
        self._count_cache: tuple[float, int] | None = None
        self._retention = _RetentionStatements(engine.dialect, self.states, h, table_prefix)
        #: The DBAPI connection of the write transaction running in this thread.
        self._writing = threading.local()

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
            # A short first page is the whole result: skip the COUNT (and when
            # the caller needs no total).
            if not query.count or (query.offset == 0 and len(rows) < query.limit):
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
        if c.op == "eq":
            equal: ColumnElement[bool] = column == c.value
            return equal
        if c.op == "ne":
            # expires_at is NULL for states without a TTL: they differ from any instant.
            return column.is_distinct_from(c.value)
        if c.op == "in":
            return column.in_(list(c.value))
        if c.op == "contains":
            # A case-sensitive substring on text columns (query.py refuses the
            # others); SQLite's LIKE would ignore ASCII case.
            find = sa.func.strpos if self.dialect == "postgresql" else sa.func.instr
            found: ColumnElement[bool] = find(column, c.value) > 0
            return found
        return compare(column, c.op, c.value)

    def scan(self, state_type: str | None = None, batch_size: int = 500) -> Iterator[list[State]]:
        s = self.states
        after: str | None = None
        while True:
            # Keyset paging on the primary key: each batch is one indexed range read.
            stmt = sa.select(*self._state_columns)
            if state_type is not None:
                stmt = stmt.where(s.c.type == state_type)
            if after is not None:
                stmt = stmt.where(s.c.state_id > after)
            with self._connect() as conn:
                rows = conn.execute(stmt.order_by(s.c.state_id).limit(batch_size)).all()
            if rows:
                yield [_state(r) for r in rows]
            if len(rows) < batch_size:
                return
            after = rows[-1][0]

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

    #: Below this many rows (by the planner's statistics) the exact count is cheap.
    EXACT_COUNT_BELOW = 50_000
    #: A SQLite count slower than this many seconds is reused by :meth:`estimate_count`...
    SLOW_COUNT_SECONDS = 0.01
    #: ... for this many seconds.
    COUNT_CACHE_SECONDS = 5.0

    def estimate_count(self) -> tuple[int, bool]:
        """PostgreSQL: the planner's row estimate for live states once the table
        is large and analysed, else the exact count. SQLite: the exact count,
        reused (and marked inexact) for :attr:`COUNT_CACHE_SECONDS` when it took
        over :attr:`SLOW_COUNT_SECONDS`."""
        if self.dialect == "postgresql":
            return self._planner_count()
        cached = self._count_cache
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.COUNT_CACHE_SECONDS:
            return cached[1], False
        count = self.count()
        done = time.monotonic()
        self._count_cache = (done, count) if done - now >= self.SLOW_COUNT_SECONDS else None
        return count, True

    @cached_property
    def _explain_live(self) -> str:
        live = (
            sa.select(sa.literal(1))
            .select_from(self.states)
            .where(self.states.c.status.not_in([DELETED, EXPIRED]))
        )
        compiled = live.compile(self.engine, compile_kwargs={"literal_binds": True})
        return f"EXPLAIN (FORMAT JSON) {compiled}"

    def _planner_count(self) -> tuple[int, bool]:
        explain = self._explain_live
        with self._connect() as conn:
            # reltuples is -1 until the first VACUUM or ANALYZE.
            analysed = conn.execute(
                # quote_ident: a prefix with capitals makes a quoted table name.
                sa.text(
                    "SELECT reltuples FROM pg_class WHERE oid = to_regclass(quote_ident(:table))"
                ),
                {"table": self.states.name},
            ).scalar()
            if analysed is not None and analysed >= self.EXACT_COUNT_BELOW:
                rows = conn.execute(sa.text(explain)).scalar_one()[0]["Plan"]["Plan Rows"]
                if rows >= self.EXACT_COUNT_BELOW:
                    return int(rows), False
        return self.count(), True

    def tally(self) -> Tally:
        s, h = self.states, self.history_table
        by_status = sa.select(s.c.type, s.c.status, sa.func.count()).group_by(s.c.type, s.c.status)
        tally = Tally()
        with self._connect() as conn:
            for type_name, status, count in conn.execute(by_status).all():
                tally.add(type_name, status, int(count))
            tally.history = int(
                conn.execute(sa.select(sa.func.count()).select_from(h)).scalar_one()
            )
        return tally

    def count_type(self, type_name: str, limit: int | None = None) -> int:
        sql = self._retention
        # No limit: NULL on PostgreSQL, -1 on SQLite.
        unbounded = None if self._sql.postgres else -1
        params = {"type": type_name, "limit": unbounded if limit is None else limit}
        params["lock"] = f"type:{type_name}"
        raw = getattr(self._writing, "raw", None)
        if raw is None:
            return int(self._read(sql.count_type, params)[0][0])
        if self._sql.postgres:
            # Creations of one type queue here until the transaction ends, so
            # the count below sees every committed one: the limit is exact.
            raw.execute(sql.lock_type, params).fetchall()
        return int(raw.execute(sql.count_type, params).fetchall()[0][0])

    def type_size(self, type_name: str) -> int:
        return int(self._read(self._retention.type_size, {"type": type_name})[0][0])

    def prune(
        self,
        type_name: str,
        retention: Retention,
        *,
        batch_size: int = 500,
        dry_run: bool = False,
    ) -> Iterator[Pruned]:
        after = ""
        while True:
            page = {"type": type_name, "after": after, "limit": batch_size}
            ids = [row[0] for row in self._read(self._retention.page, page)]
            if not ids:
                return
            yield self._prune_batch(type_name, ids, retention, dry_run)
            after = ids[-1]

    def _prune_batch(
        self, type_name: str, ids: Sequence[str], retention: Retention, dry_run: bool
    ) -> Pruned:
        """Prune one batch in one transaction, holding the batch's state rows locked."""
        sql, rsql = self._sql, self._retention
        entries, purged, trims = 0, [], []
        with self._raw() as raw:
            raw.execute("BEGIN" if sql.postgres else "BEGIN IMMEDIATE")
            try:
                rows = raw.execute(sql.select_locked, sql.ids(ids)).fetchall()
                states = [sql.state(row) for row in rows]
                states = [st for st in states if st["type"] == type_name]
                oldest = dict(raw.execute(rsql.oldest, sql.ids(ids)).fetchall())
                recent: dict[str, int] = {}
                if retention.keep_since is not None:
                    params = sql.ids(ids) | {"since": sql.time_out(retention.keep_since)}
                    recent = dict(raw.execute(rsql.oldest_since, params).fetchall())
                for state in states:
                    state_id, newest = state["state_id"], state["version"]
                    first = oldest.get(state_id)
                    if retention.purges(state):
                        purged.append(state_id)
                        entries += 0 if first is None else newest - first + 1
                        continue
                    if first is None or not retention.trims_history:
                        continue
                    # Versions are contiguous from the oldest kept entry to the newest.
                    count = newest - first  # the newest entry always stays
                    if retention.keep_last is not None:
                        count = min(count, newest - first + 1 - retention.keep_last)
                    if retention.keep_since is not None:
                        count = min(count, recent.get(state_id, newest) - first)
                    if count > 0:
                        entries += count
                        trims.append({"state_id": state_id, "cutoff": first + count - 1})
                if not dry_run:
                    if trims:
                        raw.cursor().executemany(rsql.trim, trims)
                    if purged:
                        raw.execute(rsql.purge_history, sql.ids(purged))
                        raw.execute(rsql.purge_states, sql.ids(purged))
                raw.execute("ROLLBACK" if dry_run else "COMMIT")
            except BaseException:
                if raw.info.transaction_status if sql.postgres else raw.in_transaction:
                    raw.execute("ROLLBACK")
                raise
        return Pruned(len(ids), entries, tuple(purged))

    @property
    def component(self) -> str:
        return self.dialect

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
                        ids = sql.ids(state_ids)
                        locked = raw.execute(sql.select_locked, ids)
                        if sql.select_heads is None:  # SQLite: in the locked rows
                            rows = locked.fetchall()
                            heads = {row[0]: row[-1] for row in rows}
                        else:  # PostgreSQL: after the lock, see Statements
                            heads = dict(raw.execute(sql.select_heads, ids).fetchall())
                            rows = locked.fetchall()
                        found = {row[0]: sql.state(row) for row in rows}
                        self._writing.raw = raw  # count_type reads inside this transaction
                        try:
                            writes = plan(
                                {i: found.get(i) for i in state_ids},
                                {i: heads.get(i) for i in state_ids},
                            )
                        finally:
                            self._writing.raw = None
                        wrote = True
                        checks = []
                        # In operation order, as every store writes history (and
                        # get_recent_changes lists it); two batches inserting the
                        # same new ids in opposite orders may deadlock, which
                        # PostgreSQL breaks and the engine retries (LostRace).
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
                    # Two writers raced to insert the same new id: the loser rolls
                    # back and plans again, which finds the id taken.
                    raw.execute("ROLLBACK")
                    raise LostRace() from exc
                except self._dbapi_errors.OperationalError as exc:
                    if getattr(exc, "sqlstate", None) not in _LOST_RACES:
                        self._abandon(raw)
                        raise  # the connection's trouble: see _raw
                    # A deadlock or serialization failure: PostgreSQL rolled the
                    # transaction back to let another writer through; plan again.
                    raw.execute("ROLLBACK")
                    raise LostRace() from exc
                except BaseException:
                    self._abandon(raw)
                    raise
        except _Stale as stale:
            stale.wrote = wrote
            raise
        return writes

    def _abandon(self, raw: Any) -> None:
        """Roll back the transaction open on *raw*, if any."""
        if raw.info.transaction_status if self._sql.postgres else raw.in_transaction:
            raw.execute("ROLLBACK")

    def restore(self, state: State, changes: Sequence[Change], *, replace: bool = False) -> None:
        check_restore(state, changes)
        for change in changes:
            extra = sorted(set(change) - set(CHANGE_KEYS))
            if extra:
                raise StateValidationError(
                    f"State {state['state_id']!r}: the history table has no column for "
                    f"{', '.join(map(repr, extra))}; upgrade the database (flask states "
                    "upgrade-db) or leave the key out.",
                    {"history": [f"Unknown key {k!r}." for k in extra]},
                )
        sql = self._sql
        key = {"state_id": state["state_id"]}
        with self._raw() as raw:
            try:
                with self._pipeline(raw) as flush:
                    raw.execute("BEGIN" if sql.postgres else "BEGIN IMMEDIATE")
                    if replace:
                        raw.execute(sql.delete_history, key)
                        raw.execute(sql.delete_state, key)
                    elif raw.execute(sql.stored, key).fetchall():
                        raise restore_refused(state["state_id"])
                    raw.execute(sql.insert_state, sql.state_params(state))
                    for change in changes:
                        raw.execute(sql.insert_change, sql.change_params(change))
                    flush()
                raw.execute("COMMIT")
            except self._dbapi_errors.IntegrityError as exc:
                # Another writer stored the id between the check and the insert.
                raw.execute("ROLLBACK")
                raise restore_refused(state["state_id"]) from exc
            except BaseException:
                if raw.info.transaction_status if sql.postgres else raw.in_transaction:
                    raw.execute("ROLLBACK")
                raise

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

    # -- maintenance ----------------------------------------------------------------

    def rewrite(
        self, states: StateRewrite, changes: ChangeRewrite, *, batch_size: int = 500
    ) -> tuple[int, Iterator[int]]:
        """Rewrite rows in place: states by ``state_id``, then history by ``id``.

        Each batch is one transaction. A state row is rewritten only if still
        at the version read (``UPDATE … WHERE version = ?``); history rows are
        never changed by writers, so theirs is unconditional.
        """
        s, h = self.states, self.history_table
        with self._connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(s)).scalar_one()
            total += conn.execute(sa.select(sa.func.count()).select_from(h)).scalar_one()

        def run() -> Iterator[int]:
            last_id: str | None = None
            while True:
                stmt = sa.select(*self._state_columns).order_by(s.c.state_id).limit(batch_size)
                if last_id is not None:
                    stmt = stmt.where(s.c.state_id > last_id)
                with self._connect(self.engine) as conn:
                    rows = [_state(r) for r in conn.execute(stmt).all()]
                    for row in rows:
                        new = states(row)
                        if new is not None:
                            conn.execute(
                                s.update()
                                .where(s.c.state_id == row["state_id"])
                                .where(s.c.version == row["version"])
                                .values(data=new["data"], meta=new["metadata"])
                            )
                    conn.commit()
                if not rows:
                    break
                last_id = rows[-1]["state_id"]
                yield len(rows)
            last = 0
            while True:
                query = (
                    sa.select(h.c.id, *self._change_columns)
                    .where(h.c.id > last)
                    .order_by(h.c.id)
                    .limit(batch_size)
                )
                with self._connect(self.engine) as conn:
                    found = conn.execute(query).all()
                    for entry in found:
                        rewritten = changes(_change(entry[1:]))
                        if rewritten is not None:
                            # Only documents: a NULL old_data (a create) stays SQL NULL.
                            documents = {
                                k: rewritten[k]
                                for k in ("old_data", "new_data")
                                if rewritten[k] is not None
                            }
                            conn.execute(h.update().where(h.c.id == entry[0]).values(**documents))
                    conn.commit()
                if not found:
                    break
                last = found[-1][0]
                yield len(found)

        return int(total), run()

    def reset(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.history_table.delete())
            conn.execute(self.states.delete())

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()


class _RetentionStatements:
    """The SQL of :meth:`SQLStore.count_type` and :meth:`SQLStore.prune`."""

    def __init__(self, dialect: Any, states: sa.Table, history: sa.Table, prefix: str) -> None:
        postgres = dialect.name == "postgresql"
        prep = dialect.identifier_preparer
        s, h = prep.format_table(states), prep.format_table(history)

        def p(name: str) -> str:
            return f"%({name})s" if postgres else f":{name}"

        in_ids = (
            "state_id = ANY(%(ids)s)"
            if postgres
            else ("state_id IN (SELECT value FROM json_each(:ids))")
        )
        # Index (type, status): a bounded count, paid only when a limit is set.
        self.count_type = (
            f"SELECT count(*) FROM (SELECT 1 FROM {s} WHERE type = {p('type')} "
            f"AND status NOT IN ('{DELETED}', '{EXPIRED}') LIMIT {p('limit')}) AS counted"
        )
        self.lock_type = f"SELECT pg_advisory_xact_lock(hashtext('{prefix}' || {p('lock')}))"
        self.type_size = f"SELECT count(*) FROM {s} WHERE type = {p('type')}"
        self.page = (
            f"SELECT state_id FROM {s} WHERE type = {p('type')} AND state_id > {p('after')} "
            f"ORDER BY state_id LIMIT {p('limit')}"
        )
        self.oldest = f"SELECT state_id, min(version) FROM {h} WHERE {in_ids} GROUP BY state_id"
        self.oldest_since = (
            f"SELECT state_id, min(version) FROM {h} WHERE {in_ids} "
            f"AND created_at >= {p('since')} GROUP BY state_id"
        )
        self.trim = f"DELETE FROM {h} WHERE state_id = {p('state_id')} AND version <= {p('cutoff')}"
        self.purge_history = f"DELETE FROM {h} WHERE {in_ids}"
        self.purge_states = f"DELETE FROM {s} WHERE {in_ids}"


#: SQLSTATEs of a transaction PostgreSQL aborted in favour of another writer:
#: deadlock detected, serialization failure. Running it again can succeed.
_LOST_RACES = frozenset({"40P01", "40001"})


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
