"""How the Redis store writes records down, and what it remembers of them.

Documents are JSON with timestamps in one fixed-width UTC format, so they
compare correctly as strings in Lua; declared-field index members encode a
scalar so that values equal by the reference semantics share one form. The
:class:`RecordCache` keeps, per process, the last document of each state (and
its history head) that the one-round-trip commit plans from.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple

from .. import codec
from ..definitions import DELETED, EXPIRED
from ..records import Change, State, remember_time

TOMBSTONES = (DELETED, EXPIRED)
#: A remembered record whose history head is not known (never a SHA-256 hex digest).
UNKNOWN_HEAD = "?"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class RecordCache:
    """A bounded, thread-safe LRU of each state's last known document, by id.

    Holds the encoded document (immutable bytes), its version, the hash of
    its history entry (the head the next entry chains to; a read does not
    learn it, a write or a locked read does) and, after a write, the index
    members the store computed for it (:class:`Members`, so the next write
    need not compute them again); every use decodes a fresh copy.
    A record never makes a read wrong: only :meth:`RedisStore.apply` plans from
    it, and the commit's compare-and-set refuses a plan made from a stale one.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, Remembered] = OrderedDict()
        self._lock = threading.Lock()

    def recall(self, state_ids: Sequence[str]) -> dict[str, Remembered] | None:
        """What is remembered of *state_ids*, or ``None`` unless every one is
        known with its history head."""
        found: dict[str, Remembered] = {}
        with self._lock:
            items = self._items
            for state_id in state_ids:
                item = items.get(state_id)
                if item is None or item.head == UNKNOWN_HEAD:
                    return None
                items.move_to_end(state_id)
                found[state_id] = item
        return found

    def put(
        self,
        state_id: str,
        version: int,
        document: bytes | str,
        head: str | None,
        members: Members | None = None,
    ) -> None:
        """Remember *document* and the hash of its history entry (*head*,
        ``UNKNOWN_HEAD`` from a plain read) unless a newer version is known."""
        if self._size <= 0:
            return
        with self._lock:
            items = self._items
            known = items.get(state_id)
            if known is not None:
                if known.version > version:
                    return
                if known.version == version and known.document == document:
                    # The same record, read again: keep what the write knew of it.
                    head = known.head if head == UNKNOWN_HEAD else head
                    members = members or known.members
                items.move_to_end(state_id)
            items[state_id] = Remembered(version, document, head, members)
            if len(items) > self._size:
                items.popitem(last=False)

    def forget(self, state_ids: Iterable[str]) -> None:
        with self._lock:
            for state_id in state_ids:
                self._items.pop(state_id, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class Members(NamedTuple):
    """A state's index members (``{(key, member): score}``), as computed under
    *definitions* (the store's declared-fields mapping object at the time)."""

    definitions: Mapping[str, str]
    entries: dict[tuple[str, str], int]


class Remembered(NamedTuple):
    """What the :class:`RecordCache` keeps of one state."""

    version: int
    document: bytes | str
    head: str | None
    members: Members | None


class ScriptKeys:
    """The KEYS of a script call, each once, by 1-based number."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        """Start from *names*, which are distinct."""
        self.names: list[str] = list(names)
        self._numbers = {name: number for number, name in enumerate(self.names, 1)}

    def add(self, name: str) -> int:
        """Add *name* unless present; return its number."""
        number = self._numbers.get(name)
        if number is None:
            self.names.append(name)
            number = self._numbers[name] = len(self.names)
        return number


# -- documents ------------------------------------------------------------------


def to_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def utc_stamp(value: datetime) -> str:
    """ISO-8601 UTC with microseconds always present: fixed width, ordered as strings."""
    # Keyed by the UTC value: two wall times that compare equal in one zone
    # are an hour apart when they differ only in fold (PEP 495).
    utc = value if value.tzinfo is UTC else value.astimezone(UTC)
    text = _STAMPS.get(utc)
    if text is None:
        text = utc.isoformat(timespec="microseconds")[:-6] + "Z"
        if len(_STAMPS) >= 4096:
            _STAMPS.clear()
        _STAMPS[utc] = text
        if type(utc) is datetime:  # never hand a caller's subclass to later reads
            remember_time(text, utc)  # the next write decodes it
    return text


#: Recent :func:`utc_stamp` results: a write stamps a state's created_at again
#: and again, and one time on its state and its history entry.
_STAMPS: dict[datetime, str] = {}


def epoch_micros(value: datetime) -> int:
    """Microseconds since the epoch: exact as a sorted-set score until the year 2255."""
    return (value - _EPOCH) // _MICROSECOND


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return utc_stamp(value)
    if isinstance(value, tuple):
        return [jsonable(v) for v in value]
    return value


def encode_document(record: Mapping[str, Any]) -> bytes:
    """A state or change document, its timestamps written as :func:`utc_stamp` writes them.

    orjson writes a UTC ``datetime`` the same way itself (``OPT_UTC_Z``) unless
    its microseconds are 0, which it leaves out: only then, or for another
    zone, does each timestamp go through :func:`utc_stamp`.
    """
    for key in _STAMPED:
        value = record.get(key)
        if value is not None and (
            type(value) is not datetime or value.tzinfo is not UTC or not value.microsecond
        ):
            return codec.dumps_record(record, utc_stamp)
    return codec.dumps_utc(record)


#: The timestamps of states and changes (no other value of theirs is a datetime).
_STAMPED = ("created_at", "updated_at", "expires_at")


def decode_state(raw: bytes | str) -> State:
    return State.from_json(codec.loads(raw))


def decode_change(raw: bytes | str) -> Change:
    return Change.from_json(codec.loads(raw))


def dropped_tombstone(state_id: str, version: int, change: Change | None) -> State:
    """Stand-in for a tombstone whose document Redis dropped, from its last change.

    Only the engine's plan sees it (reads return ``None``); all a plan takes from
    a tombstone is its version, so a new registration goes on from there.
    """
    status = change["metadata"].get("to_status") if change else None
    when = change["created_at"] if change else _EPOCH
    return State.from_columns(
        state_id=state_id,
        name=state_id,
        type="",
        status=status if status in TOMBSTONES else DELETED,
        data={},
        metadata={},
        version=version,
        created_at=when,
        updated_at=when,
        expires_at=None,
    )


@lru_cache(maxsize=256)
def declared_fields(declared: str) -> tuple[str, ...]:
    """The declared fields of a stored index definition, sorted."""
    return tuple(sorted(codec.loads(declared)))


def definition_json(fields: Mapping[str, bool]) -> str:
    return codec.dumps(dict(sorted(fields.items()))).decode()


# -- declared field indexes -----------------------------------------------------------


def encode_scalar(value: Any) -> bytes | None:
    """A scalar as an index key: equal (by the reference semantics) iff equal bytes.

    Kinds are tagged so ``True`` is not ``1``; numbers equal in Python (``1``
    and ``1.0``) share one form, and integers stay exact. Lists and objects
    are not indexed.
    """
    if value is None:
        return b"z"
    if value is True:
        return b"t"
    if value is False:
        return b"f"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return b"n%d" % value
    if isinstance(value, float):
        return b"n" + repr(value).encode()
    if isinstance(value, str):
        return b"s" + value.encode()
    return None


#: Declared fields split at their dots (a few per type, never evicted).
_PATHS: dict[str, tuple[str, ...]] = {}


def index_member(state: State, field: str) -> bytes | None:
    """The member of *state* in the index of *field*, or ``None`` if not a scalar there."""
    root, *path = _PATHS.get(field) or _PATHS.setdefault(field, tuple(field.split(".")))
    value: Any = state[root]
    for name in path:
        if not isinstance(value, dict) or name not in value:
            return None
        value = value[name]
    encoded = encode_scalar(value)
    return None if encoded is None else encoded + b"\0" + state["state_id"].encode()
