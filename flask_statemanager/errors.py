"""The exception hierarchy.

Every error the extension raises on bad input or a failed precondition is a
:class:`StateManagerError`. Each carries structured attributes so callers (and
the HTTP blueprints) can react without parsing messages; the message itself
says what to fix. Nothing is written when one of these is raised by a write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class StateManagerError(Exception):
    """Root of every error raised by flask-statemanager."""


class StateNotFoundError(StateManagerError, LookupError):
    """No live state has this id (it never existed, was deleted, or expired)."""

    def __init__(self, state_id: str, message: str | None = None) -> None:
        self.state_id = state_id
        super().__init__(
            message
            or f"State {state_id!r} does not exist (never registered, deleted or expired); "
            "register it first with register_state()."
        )


class StateExistsError(StateManagerError):
    """``register_state`` was given an id that already holds a live state (or a
    restore an id the store already holds)."""

    def __init__(self, state_id: str, message: str | None = None) -> None:
        self.state_id = state_id
        super().__init__(
            message
            or f"State {state_id!r} already exists; use update_state() to change it, "
            "or delete_state() first to register it anew."
        )


class StateValidationError(StateManagerError, ValueError):
    """Input was rejected; ``messages`` maps each offending field to its problems."""

    def __init__(self, message: str, messages: Mapping[str, Any] | None = None) -> None:
        self.messages: dict[str, Any] = dict(messages or {})
        super().__init__(message)


class InvalidTransitionError(StateManagerError):
    """The transition is unknown or not allowed from the state's current status."""

    def __init__(
        self,
        message: str,
        *,
        transition: str | None = None,
        status: str | None = None,
        allowed: Sequence[str] = (),
    ) -> None:
        self.transition = transition
        self.status = status
        self.allowed = tuple(allowed)
        super().__init__(message)


class StateConflictError(StateManagerError):
    """Optimistic concurrency failed: the state is not at the expected version."""

    def __init__(
        self,
        state_id: str,
        expected_version: int | None,
        actual_version: int | None,
        *,
        message: str | None = None,
    ) -> None:
        self.state_id = state_id
        self.expected_version = expected_version
        self.actual_version = actual_version
        actual = "absent" if actual_version is None else f"at version {actual_version}"
        super().__init__(
            message
            or f"State {state_id!r} is {actual}, not at expected version {expected_version}; "
            "re-read it and retry with the current version (etag)."
        )


class StateLimitError(StateManagerError):
    """A configured limit (size, nesting depth, count) would be exceeded."""

    def __init__(self, message: str, *, limit: str, value: int, maximum: int) -> None:
        self.limit = limit
        self.value = value
        self.maximum = maximum
        super().__init__(message)


class BackendUnavailableError(StateManagerError):
    """The storage backend could not be reached or failed mid-operation."""

    def __init__(self, message: str, *, backend: str) -> None:
        self.backend = backend
        super().__init__(message)


class ConfigurationError(StateManagerError):
    """The extension is configured wrongly; the message names the setting to fix."""


class MigrationError(StateManagerError):
    """A registered data migration failed on a state (it raised, or returned no dict).

    Raised where the state is read or written; nothing is written. The
    message names the state and the versions of the failing migration.
    """

    def __init__(
        self,
        message: str,
        *,
        state_id: str,
        from_version: str | None,
        to_version: str | None,
    ) -> None:
        self.state_id = state_id
        self.from_version = from_version
        self.to_version = to_version
        super().__init__(message)


__all__ = [
    "BackendUnavailableError",
    "ConfigurationError",
    "InvalidTransitionError",
    "MigrationError",
    "StateConflictError",
    "StateExistsError",
    "StateLimitError",
    "StateManagerError",
    "StateNotFoundError",
    "StateValidationError",
]
