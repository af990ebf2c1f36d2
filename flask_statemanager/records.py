"""The records callers get back: a state and a history entry (change).

Both are plain ``dict`` subclasses, so ``state["data"]``, ``dict(state)`` and
JSON encoding work as for any mapping, with read-only attribute access on top
(``state.version``). Timestamps are timezone-aware UTC ``datetime`` objects;
:meth:`State.to_json` renders them as ISO-8601 strings ending in ``Z``.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

STATE_KEYS = (
    "state_id",
    "name",
    "type",
    "status",
    "data",
    "metadata",
    "version",
    "etag",
    "created_at",
    "updated_at",
    "expires_at",
)

#: The stored columns of a state, in the order stores select them; the etag is derived.
STATE_COLUMNS = tuple(key for key in STATE_KEYS if key != "etag")

CHANGE_KEYS = (
    "change_id",
    "state_id",
    "version",
    "transition",
    "old_data",
    "new_data",
    "actor",
    "metadata",
    "created_at",
    "hash",
)


#: The version (4) and variant (RFC 4122) bits of a random UUID.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_change_id() -> str:
    """A random version-4 UUID as 32 hex digits, like ``uuid.uuid4().hex``.

    From ``os.urandom`` as ``uuid4`` is, so ids never repeat whatever the
    application does with :mod:`random` or however its workers were forked,
    but without building a ``UUID`` object (a quarter of the cost; one id is
    made per committed change).
    """
    return f"{int.from_bytes(os.urandom(16)) & _UUID4_CLEAR | _UUID4_SET:032x}"


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def isoformat(value: datetime | None) -> str | None:
    """ISO-8601 with a ``Z`` suffix for UTC, ``None`` stays ``None``."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat()[:-6] + "Z"


def parse_time(value: str | None) -> datetime | None:
    """The inverse of :func:`isoformat`: an aware UTC datetime, ``None`` stays ``None``."""
    if value is None:
        return None
    parsed = _PARSED.get(value)
    if parsed is None:
        parsed = datetime.fromisoformat(value).astimezone(UTC)
        remember_time(value, parsed)
    return parsed


#: Timestamps parsed or written lately, by their text. Every write decodes a
#: record and encodes the next one: its created_at and the previous write's
#: time come back again and again. (datetime objects are immutable.)
_PARSED: dict[str, datetime] = {}
_REMEMBERED = 4096


def remember_time(text: str, value: datetime) -> None:
    """Let :func:`parse_time` answer *value* for *text* (which renders it in UTC)."""
    if len(_PARSED) >= _REMEMBERED:
        _PARSED.clear()
    _PARSED[text] = value


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: isoformat(v) if isinstance(v, datetime) else v for k, v in record.items()}


class State(dict[str, Any]):
    """A state record: a ``dict`` with the keys ``state_id``, ``name``, ``type``,
    ``status``, ``data``, ``metadata``, ``version``, ``etag``, ``created_at``,
    ``updated_at`` and ``expires_at``, readable as attributes too.
    """

    __slots__ = ()

    @classmethod
    def from_columns(
        cls,
        state_id: str,
        name: str,
        type: str,
        status: str,
        data: dict[str, Any],
        metadata: dict[str, Any],
        version: int,
        created_at: datetime,
        updated_at: datetime,
        expires_at: datetime | None,
    ) -> State:
        """Build a record from its stored columns (:data:`STATE_COLUMNS` order)."""
        return cls(
            state_id=state_id,
            name=name,
            type=type,
            status=status,
            data=data,
            metadata=metadata,
            version=version,
            etag=str(version),
            created_at=created_at,
            updated_at=updated_at,
            expires_at=expires_at,
        )

    @property
    def state_id(self) -> str:
        """The id (1-255 characters of ``[A-Za-z0-9_.:@-]``)."""
        return self["state_id"]  # type: ignore[no-any-return]

    @property
    def name(self) -> str:
        """A descriptive name (defaults to the id)."""
        return self["name"]  # type: ignore[no-any-return]

    @property
    def type(self) -> str:
        """The type name, such as ``"user"``."""
        return self["type"]  # type: ignore[no-any-return]

    @property
    def status(self) -> str:
        """The lifecycle status, such as ``"active"``."""
        return self["status"]  # type: ignore[no-any-return]

    @property
    def data(self) -> dict[str, Any]:
        """The application's JSON object."""
        return self["data"]  # type: ignore[no-any-return]

    @property
    def metadata(self) -> dict[str, Any]:
        """JSON metadata; ``metadata["version"]`` is the schema version."""
        return self["metadata"]  # type: ignore[no-any-return]

    @property
    def version(self) -> int:
        """Starts at 1 and grows by exactly 1 per committed change."""
        return self["version"]  # type: ignore[no-any-return]

    @property
    def etag(self) -> str:
        """The version as a string, for HTTP ``ETag``/``If-Match``."""
        return self["etag"]  # type: ignore[no-any-return]

    @property
    def created_at(self) -> datetime:
        """When this state (this life of the id) was registered, UTC."""
        return self["created_at"]  # type: ignore[no-any-return]

    @property
    def updated_at(self) -> datetime:
        """When the last change was committed, UTC."""
        return self["updated_at"]  # type: ignore[no-any-return]

    @property
    def expires_at(self) -> datetime | None:
        """When the TTL ends, UTC, or ``None``."""
        return self["expires_at"]  # type: ignore[no-any-return]

    def is_expired(self, now: datetime) -> bool:
        """Whether the state's TTL has passed at *now*."""
        expires_at = self["expires_at"]
        return expires_at is not None and expires_at <= now

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy with ISO-8601 timestamps."""
        return _jsonable(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> State:
        """The inverse of :meth:`to_json` (what the Redis store and cache keep)."""
        return cls(
            doc,
            created_at=parse_time(doc["created_at"]),
            updated_at=parse_time(doc["updated_at"]),
            expires_at=parse_time(doc["expires_at"]),
        )

    def __repr__(self) -> str:
        return f"<State {self['state_id']!r} {self['type']}/{self['status']} v{self['version']}>"


class Change(dict[str, Any]):
    """A history entry: a ``dict`` with the keys ``change_id``, ``state_id``,
    ``version``, ``transition``, ``old_data``, ``new_data``, ``actor``,
    ``metadata``, ``created_at`` and ``hash``, readable as attributes too.
    """

    __slots__ = ()

    @property
    def change_id(self) -> str:
        """A unique id of this history entry."""
        return self["change_id"]  # type: ignore[no-any-return]

    @property
    def state_id(self) -> str:
        """The state this entry belongs to."""
        return self["state_id"]  # type: ignore[no-any-return]

    @property
    def version(self) -> int:
        """The state's version after this change."""
        return self["version"]  # type: ignore[no-any-return]

    @property
    def transition(self) -> str:
        """The transition name, such as ``"suspend"``."""
        return self["transition"]  # type: ignore[no-any-return]

    @property
    def old_data(self) -> dict[str, Any] | None:
        """``data`` before the change (``None`` on create)."""
        return self["old_data"]  # type: ignore[no-any-return]

    @property
    def new_data(self) -> dict[str, Any] | None:
        """``data`` after the change (``None`` on delete)."""
        return self["new_data"]  # type: ignore[no-any-return]

    @property
    def actor(self) -> str | None:
        """Who made the change, as passed by the caller (``"ttl"`` for expiry)."""
        return self["actor"]  # type: ignore[no-any-return]

    @property
    def metadata(self) -> dict[str, Any]:
        """``from_status``, ``to_status`` and details such as ``rollback_to``."""
        return self["metadata"]  # type: ignore[no-any-return]

    @property
    def created_at(self) -> datetime:
        """When the change was committed, UTC."""
        return self["created_at"]  # type: ignore[no-any-return]

    @property
    def hash(self) -> str | None:
        """SHA-256 of this entry chained to the one before it (see :mod:`.audit`)."""
        return self["hash"]  # type: ignore[no-any-return]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy with ISO-8601 timestamps."""
        return _jsonable(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Change:
        """The inverse of :meth:`to_json`."""
        return cls(doc, created_at=parse_time(doc["created_at"]))

    def __repr__(self) -> str:
        return f"<Change {self['state_id']!r} v{self['version']} {self['transition']}>"
