"""Search: parsing filters into conditions, evaluating them, and the :class:`Page`.

Filters are ``{"data.status": "active", "data.age__gte": 18}``: a field (a
record column, or a dotted path into ``data``/``metadata``) with an optional
operator suffix. :func:`parse_query` turns them into a backend-neutral
:class:`Query`; each store translates it into its own query language
(SQL JSON operators, Redis indexes) and runs it there. :func:`matches` is the
reference semantics, used by the memory store and by the tests.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .errors import StateValidationError
from .records import State

OPERATORS = frozenset({"eq", "ne", "gt", "gte", "lt", "lte", "in", "contains", "exists"})
#: Record columns that can be filtered and ordered on.
COLUMNS = frozenset(
    {"state_id", "name", "type", "status", "version", "created_at", "updated_at", "expires_at"}
)
_JSON_ROOTS = frozenset({"data", "metadata"})
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_MAX_SEGMENTS = 8
_SCALARS = (str, int, float, bool, type(None))
_RANGE_OPS = frozenset({"gt", "gte", "lt", "lte"})
#: Record columns holding text: the only columns ``__contains`` applies to.
_TEXT_COLUMNS = frozenset({"state_id", "name", "type", "status"})


@dataclass(frozen=True, slots=True)
class Condition:
    """One filter: ``root`` is a column name or ``data``/``metadata`` with ``path`` inside it."""

    root: str
    path: tuple[str, ...]
    op: str
    value: Any

    @property
    def is_json(self) -> bool:
        return self.root in _JSON_ROOTS


@dataclass(frozen=True, slots=True)
class Order:
    """Sort key: a record column and its direction."""

    root: str
    path: tuple[str, ...]
    descending: bool


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed search: what every store's ``query`` receives."""

    type: str | None
    conditions: tuple[Condition, ...]
    order: Order
    offset: int
    limit: int
    #: Rows whose ``expires_at`` is at or before this instant are left out.
    now: datetime
    #: ``False``: the caller needs no total (keyset scans); a store may then
    #: skip counting and report the page's length.
    count: bool = True


class Page(Sequence[State]):
    """One page of search results.

    Iterable and indexable like a list of records, with the paging facts of
    Flask-SQLAlchemy's ``Pagination``.
    """

    __slots__ = ("items", "total", "page", "per_page")

    def __init__(self, items: list[State], total: int, page: int, per_page: int) -> None:
        self.items = items
        self.total = total
        self.page = page
        self.per_page = per_page

    @property
    def pages(self) -> int:
        """Number of pages (0 when there are no results)."""
        return math.ceil(self.total / self.per_page) if self.total else 0

    @property
    def has_next(self) -> bool:
        """Whether a page follows this one."""
        return self.page < self.pages

    @property
    def has_prev(self) -> bool:
        """Whether a page precedes this one."""
        return self.page > 1

    def __iter__(self) -> Iterator[State]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: Any) -> Any:
        return self.items[index]

    def __repr__(self) -> str:
        return f"<Page {self.page}/{self.pages} of {self.total}>"


def _invalid(field: str, problem: str) -> StateValidationError:
    return StateValidationError(f"Invalid filter {field!r}: {problem}.", {field: [problem]})


def split_field(field: str) -> tuple[str, tuple[str, ...]]:
    """Split ``"data.a.b"`` into ``("data", ("a", "b"))``; columns have an empty path.

    :raises StateValidationError: not a column nor a plain dotted path.
    """
    if not isinstance(field, str):
        raise _invalid(str(field), "field names are strings")
    root, _, rest = field.partition(".")
    if root in COLUMNS and not rest:
        return root, ()
    if root in _JSON_ROOTS and rest:
        path = tuple(rest.split("."))
        if len(path) <= _MAX_SEGMENTS and all(_SEGMENT_RE.match(p) for p in path):
            return root, path
        raise _invalid(
            field,
            f"use a plain dotted path of at most {_MAX_SEGMENTS} names made of letters, "
            "digits and underscores, like 'data.address.city'",
        )
    raise _invalid(
        field,
        f"filter on {', '.join(sorted(COLUMNS))}, or a dotted path into data or metadata "
        "like 'data.status'",
    )


def _check_value(field: str, root: str, op: str, value: Any) -> Any:
    if op == "exists":
        if root not in _JSON_ROOTS:
            raise _invalid(field, "__exists applies to data and metadata paths")
        if type(value) is not bool:
            raise _invalid(field, "__exists takes True or False")
        return value
    if op == "contains" and root in COLUMNS and root not in _TEXT_COLUMNS:
        raise _invalid(
            field,
            "__contains applies to data and metadata paths and to the text columns "
            + ", ".join(sorted(_TEXT_COLUMNS)),
        )
    if op == "in":
        if not isinstance(value, list | tuple | set | frozenset) or not value:
            raise _invalid(field, "__in takes a non-empty list of values")
        return tuple(_check_scalar(field, root, "in", v) for v in value)
    return _check_scalar(field, root, op, value)


def _check_scalar(field: str, root: str, op: str, value: Any) -> Any:
    if root in {"created_at", "updated_at", "expires_at"}:
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise _invalid(field, "timestamps are ISO-8601 strings or datetimes") from None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise _invalid(field, "compare timestamps with timezone-aware datetimes")
        return value
    if root == "version":
        if type(value) is not int:
            raise _invalid(field, "version is compared with an integer")
        return value
    if root in COLUMNS and not isinstance(value, str):
        raise _invalid(field, f"{root} is compared with a string")
    if not isinstance(value, _SCALARS):
        raise _invalid(field, "compare JSON fields with a string, number, boolean or None")
    if isinstance(value, float) and not math.isfinite(value):
        raise _invalid(field, "NaN and infinity are not JSON numbers")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise _invalid(field, "integers are compared within 64 bits")
    if isinstance(value, str) and (
        "\x00" in value or not value.isascii() and not _encodable(value)
    ):
        raise _invalid(field, "strings must be valid Unicode text without NUL characters")
    if root in COLUMNS:
        return value
    if op in _RANGE_OPS and (value is None or isinstance(value, bool)):
        raise _invalid(field, f"__{op} compares with a number or a string")
    if op == "contains" and not isinstance(value, _SCALARS):
        raise _invalid(field, "__contains takes a string (substring) or a scalar (list item)")
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_conditions(filters: Mapping[str, Any] | None) -> tuple[Condition, ...]:
    """Turn a filters mapping into conditions, rejecting anything unknown."""
    if filters is None:
        return ()
    if not isinstance(filters, Mapping):
        raise StateValidationError(
            "filters must be a mapping like {'data.status': 'active'}.",
            {"filters": ["Must be a mapping."]},
        )
    conditions = []
    for key, value in filters.items():
        field, op = key, "eq"
        if isinstance(key, str) and "__" in key:
            head, _, suffix = key.rpartition("__")
            if suffix in OPERATORS:
                field, op = head, suffix
            elif "." not in suffix:
                raise _invalid(
                    key,
                    f"unknown operator __{suffix}; use one of "
                    + ", ".join(f"__{o}" for o in sorted(OPERATORS - {"eq"})),
                )
        root, path = split_field(field)
        conditions.append(Condition(root, path, op, _check_value(key, root, op, value)))
    return tuple(conditions)


def parse_order(order_by: str) -> Order:
    """Parse ``"-updated_at"`` into an :class:`Order`.

    Results are ordered by a record column; ties are broken by ``state_id`` so
    pages never overlap.
    """
    column = order_by[1:] if isinstance(order_by, str) and order_by[:1] == "-" else order_by
    if column not in COLUMNS:
        raise StateValidationError(
            f"Cannot order by {order_by!r}; use one of {', '.join(sorted(COLUMNS))}, "
            "with a leading '-' for descending order.",
            {"order_by": ["Unknown column."]},
        )
    return Order(column, (), order_by[0] == "-")


def check_paging(page: int, per_page: int, max_per_page: int) -> None:
    """Raise :class:`StateValidationError` for a page or page size out of range."""
    problems: dict[str, list[str]] = {}
    if type(page) is not int or not 1 <= page <= 10**9:
        problems["page"] = ["Pages are numbered from 1 to 10**9."]
    if type(per_page) is not int or not 1 <= per_page <= max_per_page:
        problems["per_page"] = [
            f"Must be between 1 and {max_per_page} (STATEMANAGER_MAX_PER_PAGE)."
        ]
    if problems:
        raise StateValidationError(
            "Invalid paging: " + "; ".join(f"{k}: {v[0]}" for k, v in problems.items()),
            problems,
        )


# -- reference semantics ---------------------------------------------------

_MISSING = object()


def resolve(record: Mapping[str, Any], root: str, path: tuple[str, ...]) -> Any:
    """The value at *root*/*path* in *record*, or a private sentinel when absent."""
    value: Any = record[root]
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


def _equal(a: Any, b: Any) -> bool:
    return _kind(a) == _kind(b) and a == b


def _compare(a: Any, op: str, b: Any) -> bool:
    if _kind(a) != _kind(b):
        return False
    if op == "gt":
        return bool(a > b)
    if op == "gte":
        return bool(a >= b)
    if op == "lt":
        return bool(a < b)
    return bool(a <= b)


def matches(record: Mapping[str, Any], condition: Condition) -> bool:
    """Whether *record* satisfies *condition* (the semantics every store implements)."""
    value = resolve(record, condition.root, condition.path)
    op, wanted = condition.op, condition.value
    if op == "exists":
        return (value is not _MISSING) is wanted
    if value is _MISSING:
        return op == "ne"
    if op == "eq":
        return _equal(value, wanted)
    if op == "ne":
        return not _equal(value, wanted)
    if op == "in":
        return any(_equal(value, w) for w in wanted)
    if op == "contains":
        if isinstance(value, list):
            return any(_equal(item, wanted) for item in value)
        return isinstance(value, str) and isinstance(wanted, str) and wanted in value
    return _compare(value, op, wanted)
