"""JSON filters compiled to each database's JSON operators.

Paths are validated by :func:`flask_statemanager.query.split_field` (letters,
digits, underscores), so inlining them as literals is safe, and it is required:
an expression index is only used when the query repeats its expression exactly.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.elements import ColumnElement

from ..query import Condition
from .sql_tables import TEXT_COLLATION


class JSONDialect(ABC):
    """How one database reads a value at a path inside a JSON column."""

    @abstractmethod
    def value(self, column: str, path: tuple[str, ...]) -> ColumnElement[Any]:
        """The expression for the value at *path*; declared indexes use it too."""

    @abstractmethod
    def condition(self, c: Condition) -> ColumnElement[bool]:
        """The SQL for one filter on a JSON path."""


class PostgresJSON(JSONDialect):
    """``data #> '{"a","b"}'`` is a jsonb value; jsonb equality is already type-aware.

    ``#>`` reads an all-digit path element as an index when it meets an array,
    where the reference (and SQLite's ``json_extract`` with quoted keys) only
    walks objects: a path with such an element also needs its parent to be an
    object. The guard sits beside the indexed expression, so a declared index
    still serves the comparison.

    jsonb orders strings by the database's collation and cannot be given
    another, so a string range compares the text ``#>>`` reads, ``COLLATE
    "C"`` (code points, as every other store). The declared index on the jsonb
    value serves equality, ``__in`` and number ranges; a string range reads the
    type's rows through the index's ``type`` prefix.
    """

    def _literal(self, path: tuple[str, ...]) -> str:
        # Quoted elements: unquoted, an element spelled NULL is a null, not a key.
        quoted = ('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in path)
        return "'{" + ",".join(quoted) + "}'"

    def value(self, column: str, path: tuple[str, ...]) -> ColumnElement[Any]:
        return sa.literal_column(f"({column} #> {self._literal(path)})", type_=JSONB)

    def _text(self, column: str, path: tuple[str, ...]) -> ColumnElement[Any]:
        """The value at *path* as text, compared by code point."""
        return sa.literal_column(
            f'(({column} #>> {self._literal(path)}) COLLATE "{TEXT_COLLATION}")', type_=sa.Text
        )

    def _objects(self, column: str, path: tuple[str, ...]) -> ColumnElement[bool] | None:
        """True when every parent of an all-digit element is an object (None: no such element)."""
        checks = [
            sa.func.jsonb_typeof(self.value(column, path[:i]) if i else sa.literal_column(column))
            == "object"
            for i, part in enumerate(path)
            if part.isdigit()
        ]
        return sa.and_(*checks) if checks else None

    def _typeof(self, expr: ColumnElement[Any]) -> ColumnElement[Any]:
        return sa.func.jsonb_typeof(expr)

    def condition(self, c: Condition) -> ColumnElement[bool]:
        column = column_name(c.root)
        found = self._found(c)
        objects = self._objects(column, c.path)
        if objects is None:
            return found
        if c.op == "ne" or (c.op == "exists" and not c.value):
            # Holds for a path that is not there, which includes one through an array.
            return sa.or_(found, sa.not_(sa.func.coalesce(objects, False)))
        return sa.and_(objects, found)

    def _found(self, c: Condition) -> ColumnElement[bool]:
        """The condition on the value ``#>`` reads (which may come through an array)."""
        expr = self.value(column_name(c.root), c.path)
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
            text = self._text(column_name(c.root), c.path)
            return sa.or_(
                in_array,
                sa.and_(self._typeof(expr) == "string", sa.func.strpos(text, value) > 0),
            )
        if isinstance(value, str):
            return sa.and_(
                compare(self._text(column_name(c.root), c.path), op, value),
                self._typeof(expr) == "string",
            )
        return sa.and_(
            compare(expr, op, sa.bindparam(None, value, type_=JSONB)),
            self._typeof(expr) == "number",
        )


class SQLiteJSON(JSONDialect):
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
        column, path, op, value = column_name(c.root), c.path, c.op, c.value
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
            compare(self.value(column, path), op, value),
            self._type(column, path).in_(kinds),
        )


def column_name(root: str) -> str:
    return "metadata" if root == "metadata" else "data"


_COMPARISONS = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}


def compare(expr: ColumnElement[Any], op: str, value: Any) -> ColumnElement[bool]:
    result: ColumnElement[bool] = _COMPARISONS[op](expr, value)
    return result


def json_dialect(name: str) -> JSONDialect:
    """The JSON compiler for a SQLAlchemy dialect name."""
    return PostgresJSON() if name == "postgresql" else SQLiteJSON()
