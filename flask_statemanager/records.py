"""The records callers get back: a state and a history entry (change).

Both are plain ``dict`` subclasses, so ``state["data"]``, ``dict(state)`` and
JSON encoding work as for any mapping, with read-only attribute access on top
(``state.version``). Timestamps are timezone-aware UTC ``datetime`` objects;
:meth:`State.to_json` renders them as ISO-8601 strings ending in ``Z``.
"""

from __future__ import annotations

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
)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def isoformat(value: datetime | None) -> str | None:
    """ISO-8601 with a ``Z`` suffix for UTC, ``None`` stays ``None``."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: isoformat(v) if isinstance(v, datetime) else v for k, v in record.items()}


class State(dict[str, Any]):
    """A state record: a mapping with the keys of :data:`STATE_KEYS`."""

    __slots__ = ()

    @property
    def state_id(self) -> str:
        return self["state_id"]  # type: ignore[no-any-return]

    @property
    def name(self) -> str:
        return self["name"]  # type: ignore[no-any-return]

    @property
    def type(self) -> str:
        return self["type"]  # type: ignore[no-any-return]

    @property
    def status(self) -> str:
        return self["status"]  # type: ignore[no-any-return]

    @property
    def data(self) -> dict[str, Any]:
        return self["data"]  # type: ignore[no-any-return]

    @property
    def metadata(self) -> dict[str, Any]:
        return self["metadata"]  # type: ignore[no-any-return]

    @property
    def version(self) -> int:
        return self["version"]  # type: ignore[no-any-return]

    @property
    def etag(self) -> str:
        return self["etag"]  # type: ignore[no-any-return]

    @property
    def created_at(self) -> datetime:
        return self["created_at"]  # type: ignore[no-any-return]

    @property
    def updated_at(self) -> datetime:
        return self["updated_at"]  # type: ignore[no-any-return]

    @property
    def expires_at(self) -> datetime | None:
        return self["expires_at"]  # type: ignore[no-any-return]

    def is_expired(self, now: datetime) -> bool:
        """Whether the state's TTL has passed at *now*."""
        expires_at = self["expires_at"]
        return expires_at is not None and expires_at <= now

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy with ISO-8601 timestamps."""
        return _jsonable(self)

    def __repr__(self) -> str:
        return f"<State {self['state_id']!r} {self['type']}/{self['status']} v{self['version']}>"


class Change(dict[str, Any]):
    """A history entry: a mapping with the keys of :data:`CHANGE_KEYS`."""

    __slots__ = ()

    @property
    def change_id(self) -> str:
        return self["change_id"]  # type: ignore[no-any-return]

    @property
    def state_id(self) -> str:
        return self["state_id"]  # type: ignore[no-any-return]

    @property
    def version(self) -> int:
        return self["version"]  # type: ignore[no-any-return]

    @property
    def transition(self) -> str:
        return self["transition"]  # type: ignore[no-any-return]

    @property
    def old_data(self) -> dict[str, Any] | None:
        return self["old_data"]  # type: ignore[no-any-return]

    @property
    def new_data(self) -> dict[str, Any] | None:
        return self["new_data"]  # type: ignore[no-any-return]

    @property
    def actor(self) -> str | None:
        return self["actor"]  # type: ignore[no-any-return]

    @property
    def metadata(self) -> dict[str, Any]:
        return self["metadata"]  # type: ignore[no-any-return]

    @property
    def created_at(self) -> datetime:
        return self["created_at"]  # type: ignore[no-any-return]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy with ISO-8601 timestamps."""
        return _jsonable(self)

    def __repr__(self) -> str:
        return f"<Change {self['state_id']!r} v{self['version']} {self['transition']}>"
