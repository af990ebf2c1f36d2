"""Hand-compiled SQL for the hot paths: read one state, read many, and write.

SQLAlchemy Core costs about 120 µs of Python per statement (pool events,
execution context, result processing) where a PostgreSQL primary-key lookup
takes about 40 µs, so the store runs these few statements on the pool's DBAPI
connections directly. The SQL text is built once per store from the table
definitions in :mod:`.sql_tables`; values are adapted here exactly as the
column types there would adapt them, so both paths read each other's rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from .. import codec
from ..records import CHANGE_KEYS, STATE_COLUMNS, Change, State
from .base import Write
from .sql_tables import SQLITE_TIME_FORMAT

_STATE_COLUMNS = STATE_COLUMNS
_CHANGE_COLUMNS = CHANGE_KEYS
_JSON_COLUMNS = frozenset({"data", "metadata", "old_data", "new_data"})


class Statements:
    """The hot-path SQL of one store and the value adaptation it needs."""

    def __init__(self, dialect: Dialect, states: sa.Table, history: sa.Table) -> None:
        self.postgres = dialect.name == "postgresql"
        prep = dialect.identifier_preparer
        s, h = prep.format_table(states), prep.format_table(history)

        def param(name: str, prefix: str = "") -> str:
            marker = f"%({prefix}{name})s" if self.postgres else f":{prefix}{name}"
            # JSON travels as text (encoded by orjson) and becomes jsonb server-side.
            return f"{marker}::jsonb" if self.postgres and name in _JSON_COLUMNS else marker

        def read(column: str) -> str:
            # jsonb comes back as text for orjson, faster than psycopg's json.loads.
            return f"{column}::text" if self.postgres and column in _JSON_COLUMNS else column

        columns = ", ".join(read(c) for c in _STATE_COLUMNS)
        if self.postgres:
            in_ids = "state_id = ANY(%(ids)s)"
        else:
            in_ids = "state_id IN (SELECT value FROM json_each(:ids))"
        self.select_one = f"SELECT {columns} FROM {s} WHERE state_id = {param('state_id')}"
        self.select_many = f"SELECT {columns} FROM {s} WHERE {in_ids}"
        # Rows a write reads, locked until commit on PostgreSQL in id order, so
        # multi-state writes cannot deadlock; SQLite's BEGIN IMMEDIATE locks all.
        # With them, the hash of each state's newest history entry (its version
        # is the state's), which the new entries chain to. On PostgreSQL that
        # is a statement of its own, run after the lock is taken (in the same
        # round trip): a writer that waited for the lock gets the row as
        # committed, but a subquery of the locking SELECT would still read the
        # history as of before the wait. SQLite takes its writer lock before the
        # read, so there a subquery is exact, and saves a statement per write.
        self.select_heads: str | None
        if self.postgres:
            self.select_locked = f"{self.select_many} ORDER BY state_id FOR UPDATE"
            self.select_heads = (
                f"SELECT {s}.state_id, {h}.hash FROM {s} JOIN {h} "
                f"ON {h}.state_id = {s}.state_id AND {h}.version = {s}.version "
                f"WHERE {s}.{in_ids}"
            )
        else:
            head = (
                f"(SELECT hash FROM {h} WHERE {h}.state_id = {s}.state_id "
                f"AND {h}.version = {s}.version)"
            )
            self.select_locked = (
                f"SELECT {columns}, {head} FROM {s} WHERE {in_ids} ORDER BY state_id"
            )
            self.select_heads = None
        self.insert_state = (
            f"INSERT INTO {s} ({', '.join(_STATE_COLUMNS)}) "
            f"VALUES ({', '.join(param(c) for c in _STATE_COLUMNS)})"
        )
        assignments = ", ".join(f"{c} = {param(c)}" for c in _STATE_COLUMNS[1:])
        self.update_state = (
            f"UPDATE {s} SET {assignments} "
            f"WHERE state_id = {param('state_id')} AND version = {param('expected')}"
        )
        self.insert_change = (
            f"INSERT INTO {h} ({', '.join(_CHANGE_COLUMNS)}) "
            f"VALUES ({', '.join(param(c) for c in _CHANGE_COLUMNS)})"
        )
        # Restores (flask states import): whether an id is stored, and dropping it.
        self.stored = (
            f"SELECT 1 FROM {s} WHERE state_id = {param('state_id')} "
            f"UNION ALL SELECT 1 FROM {h} WHERE state_id = {param('state_id')} LIMIT 1"
        )
        self.delete_state = f"DELETE FROM {s} WHERE state_id = {param('state_id')}"
        self.delete_history = f"DELETE FROM {h} WHERE state_id = {param('state_id')}"
        # PostgreSQL: the compare-and-set and the history append in one statement.
        # The history row is inserted only if the state row was written, so a
        # lost compare-and-set writes neither, and shows as a row count of 0.
        append = (
            f"INSERT INTO {h} ({', '.join(_CHANGE_COLUMNS)}) "
            f"SELECT {', '.join(param(c, 'c_') for c in _CHANGE_COLUMNS)} FROM cas"
        )
        self.cas_insert = f"WITH cas AS ({self.insert_state} RETURNING 1) {append}"
        self.cas_update = f"WITH cas AS ({self.update_state} RETURNING 1) {append}"

    # -- values ----------------------------------------------------------------

    def time_out(self, value: datetime | None) -> Any:
        """A timestamp parameter as the driver takes it (SQLite: the fixed text format)."""
        if value is None or self.postgres:
            return value
        return value.astimezone(UTC).strftime(SQLITE_TIME_FORMAT)

    def _time_in(self, value: Any) -> datetime:
        if self.postgres:
            return value.astimezone(UTC)  # type: ignore[no-any-return]
        return datetime.fromisoformat(value).replace(tzinfo=UTC)

    def ids(self, state_ids: Sequence[str]) -> dict[str, Any]:
        """Parameters of ``select_many``/``select_locked``."""
        return {"ids": list(state_ids) if self.postgres else codec.dumps_str(list(state_ids))}

    def state_params(self, state: State, expected: int | None = None) -> dict[str, Any]:
        """Parameters of ``insert_state`` (and ``update_state`` with *expected*)."""
        params = {
            "state_id": state["state_id"],
            "name": state["name"],
            "type": state["type"],
            "status": state["status"],
            "data": codec.dumps_str(state["data"]),
            "metadata": codec.dumps_str(state["metadata"]),
            "version": state["version"],
            "created_at": self.time_out(state["created_at"]),
            "updated_at": self.time_out(state["updated_at"]),
            "expires_at": self.time_out(state["expires_at"]),
        }
        if expected is not None:
            params["expected"] = expected
        return params

    def change_params(self, change: Change) -> dict[str, Any]:
        """Parameters of ``insert_change``."""
        old, new = change["old_data"], change["new_data"]
        return {
            "change_id": change["change_id"],
            "state_id": change["state_id"],
            "version": change["version"],
            "transition": change["transition"],
            "old_data": None if old is None else codec.dumps_str(old),
            "new_data": None if new is None else codec.dumps_str(new),
            "actor": change["actor"],
            "metadata": codec.dumps_str(change["metadata"]),
            "created_at": self.time_out(change["created_at"]),
            "hash": change.get("hash"),
        }

    def write(self, write: Write) -> list[tuple[str, dict[str, Any], bool]]:
        """The statements of one write: SQL, parameters, and whether exactly one row
        must be affected (a compare-and-set that lost affects none)."""
        create = write.expected_version == 0
        state = self.state_params(write.state, None if create else write.expected_version)
        change = self.change_params(write.change)
        if self.postgres:
            params = state | {f"c_{k}": v for k, v in change.items()}
            return [(self.cas_insert if create else self.cas_update, params, True)]
        first = (self.insert_state, state, False) if create else (self.update_state, state, True)
        return [first, (self.insert_change, change, False)]

    def state(self, row: Sequence[Any]) -> State:
        """The record of a row selected by one of the statements above."""
        return State.from_columns(
            row[0],
            row[1],
            row[2],
            row[3],
            codec.loads(row[4]),
            codec.loads(row[5]),
            row[6],
            self._time_in(row[7]),
            self._time_in(row[8]),
            None if row[9] is None else self._time_in(row[9]),
        )
