"""The store contract: what every backend implements, and nothing more.

The engine reads raw rows (deleted and expired ones included) and writes
through :meth:`Store.apply`; a store never decides lifecycle, validation or TTL
policy. ``apply`` reads the states a change touches, lets the engine plan the
:class:`Write` batch from what it read, and commits each state's
compare-and-set *and* its history entry, all or nothing: a store must never
leave a state without its history entry or the reverse, and must refuse a
write whose expected version is not the stored one.

Stores hold a lock from the read to the commit (SQL row locks, SQLite's single
writer, a process lock, short Redis lock keys), so concurrent writers queue
instead of conflicting; the compare-and-set stays the safety net, and a lost
one makes the engine retry from a fresh read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from ..definitions import TypeDefinition
from ..query import Query
from ..records import Change, State


@dataclass(frozen=True, slots=True)
class Write:
    """One state's compare-and-set and its history entry.

    :param state: the full new record; its version is ``expected_version + 1``.
    :param expected_version: the stored version this write replaces; ``0``
        means the id must not exist yet.
    :param change: the history entry, committed with the state.
    """

    state: State
    expected_version: int
    change: Change


#: Given the stored rows (``None`` for absent ids) and each state's newest
#: history hash (``None``: no history), returns the writes to commit.
Plan = Callable[[Mapping[str, State | None], Mapping[str, str | None]], Sequence[Write]]


class VersionMismatch(Exception):
    """A compare-and-set lost: the stored version is not the expected one.

    Internal to the engine, which turns it into a retry or a
    :class:`~flask_statemanager.errors.StateConflictError`.
    """

    def __init__(self, state_id: str, actual_version: int | None) -> None:
        self.state_id = state_id
        self.actual_version = actual_version
        super().__init__(state_id, actual_version)


class Store(ABC):
    """Persistence for states and their history."""

    #: Short name used in health checks and metrics (``"sql"``, ``"memory"``, ``"redis"``).
    kind: ClassVar[str]
    #: Lives with the app (SQLite file, memory): schema is created at ``init_app``.
    embedded: bool = False

    @property
    def primary(self) -> Store:
        """The store that holds the records, behind any cache (checks read it)."""
        return self

    @abstractmethod
    def setup(self, types: Iterable[TypeDefinition]) -> None:
        """Create what the store needs (tables, declared indexes); idempotent."""

    @abstractmethod
    def get(self, state_id: str) -> State | None:
        """The stored record, deleted and expired ones included, or ``None``."""

    @abstractmethod
    def get_many(self, state_ids: Sequence[str]) -> dict[str, State]:
        """Stored records by id, in one round trip; missing ids are left out."""

    @abstractmethod
    def apply(self, state_ids: Sequence[str], plan: Plan) -> Sequence[Write]:
        """Read *state_ids*, call ``plan(rows, heads)``, and commit the writes it returns.

        *heads* are the ``hash`` of each state's newest history entry, read
        with the rows: the engine chains the new entries to them.

        Each write is a compare-and-set of its state plus the append of its
        history entry; all of them commit together or not at all. An exception
        from *plan* aborts with nothing written. A store may call *plan* more
        than once in one call (say, first from records it remembers, then from
        a fresh read); each call's writes replace the previous ones.

        :returns: the committed writes.
        :raises VersionMismatch: a state is not at its expected version; nothing
            was written.
        """

    @abstractmethod
    def query(self, query: Query) -> tuple[list[State], int]:
        """One page of live states (not deleted nor expired) matching *query*, and the total."""

    @abstractmethod
    def history(self, state_id: str, transition: str | None = None) -> list[Change]:
        """A state's history entries, oldest first, optionally of one transition."""

    @abstractmethod
    def recent_changes(self, state_id: str | None, limit: int) -> list[Change]:
        """The newest history entries, of one state or of all, newest first."""

    @abstractmethod
    def expired(self, now: datetime, limit: int) -> list[State]:
        """Up to *limit* records whose TTL passed but whose expiry is not recorded yet."""

    @abstractmethod
    def state_ids(self, after: str | None, limit: int) -> list[str]:
        """Up to *limit* ids of states that have history, in id order, after *after*.

        Deleted and expired states are included: this walks everything stored,
        for maintenance (``flask states verify``), a page at a time.
        """

    @abstractmethod
    def count(self) -> int:
        """How many states are stored and neither deleted nor expired."""

    @abstractmethod
    def check(self) -> dict[str, Any]:
        """Probe the backend; return facts for the health report.

        :raises BackendUnavailableError: the backend does not answer.
        """

    @abstractmethod
    def reset(self) -> None:
        """Delete every state and history entry (tests and demos)."""

    def components(self) -> dict[str, dict[str, Any]]:
        """Health of the parts besides the primary store (a cache), by name; never raises.

        Each is ``{"component", "status": "up"|"down", ...}``; one that is down
        makes the manager ``degraded``, not ``unhealthy``.
        """
        return {}

    @property
    def cache_hit_rate(self) -> float | None:
        """Share of reads served by a cache since start, or ``None`` without one."""
        return None

    def cache_stats(self) -> dict[str, Any] | None:
        """A cache's counters (hits, misses, fills, errors, ...), or ``None`` without one."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections the store owns."""
