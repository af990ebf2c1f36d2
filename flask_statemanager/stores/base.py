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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from ..definitions import DELETED, TypeDefinition
from ..errors import StateExistsError, StateManagerError, StateValidationError
from ..query import Query
from ..records import Change, State


@dataclass(frozen=True, slots=True)
class Write:
    """One state's compare-and-set and its history entry.

    :param state: the full new record; its version is ``expected_version + 1``.
    :param expected_version: the stored version this write replaces; ``0``
        means the id must not exist yet.
    :param change: the history entry, committed with the state.
    :param limit: set when the write creates a state of a type with a
        ``max_states``: that maximum. The engine checked it when planning; a
        store whose lock does not cover other writers of the type (Redis)
        checks it again as it commits.
    """

    state: State
    expected_version: int
    change: Change
    limit: int | None = None


@dataclass(slots=True)
class Tally:
    """What a store holds: states by type and status, and history entries in all."""

    #: ``{type: {status: count}}``, deleted and expired states included.
    states: dict[str, dict[str, int]] = field(default_factory=dict)
    history: int = 0

    def add(self, type_name: str, status: str, count: int = 1) -> None:
        """Count *count* states of *type_name* in *status*."""
        by_status = self.states.setdefault(type_name, {})
        by_status[status] = by_status.get(status, 0) + count


#: Given the stored rows (``None`` for absent ids) and each state's newest
#: history hash (``None``: no history), returns the writes to commit.
Plan = Callable[[Mapping[str, State | None], Mapping[str, str | None]], Sequence[Write]]

#: Given a stored state (tombstones included), the record to store in its place
#: (only ``data`` and ``metadata`` may differ), or ``None`` to leave it.
StateRewrite = Callable[[State], State | None]
#: Given a stored history entry, the entry to store in its place (only
#: ``old_data`` and ``new_data`` may differ), or ``None`` to leave it.
ChangeRewrite = Callable[[Change], Change | None]


@dataclass(frozen=True, slots=True)
class Retention:
    """What :meth:`Store.prune` removes from the states of one type.

    History is trimmed from its oldest end only: the entries removed from a
    state are the longest run of its oldest ones that every given rule lets
    go, and never its newest entry (the change that made the current version).
    The entries left keep their versions; none is rewritten.

    :param keep_last: keep at least the newest *keep_last* entries of each state.
    :param keep_since: keep every entry created at or after this time.
    :param purge_before: remove whole deleted states (the tombstone and every
        history entry) deleted at or before this time.
    """

    keep_last: int | None = None
    keep_since: datetime | None = None
    purge_before: datetime | None = None

    @property
    def trims_history(self) -> bool:
        """Whether a history rule is set (otherwise only purging applies)."""
        return self.keep_last is not None or self.keep_since is not None

    def removable(self, entries: Sequence[Change]) -> int:
        """How many of a state's *entries* (oldest first) this retention removes."""
        if not self.trims_history or not entries:
            return 0
        count = len(entries) - 1
        if self.keep_last is not None:
            count = min(count, len(entries) - self.keep_last)
        if self.keep_since is not None:
            since = self.keep_since
            old = next((i for i, c in enumerate(entries) if c["created_at"] >= since), count)
            count = min(count, old)
        return max(0, count)

    def purges(self, state: State) -> bool:
        """Whether *state* is a tombstone of a deletion old enough to purge."""
        return (
            self.purge_before is not None
            and state["status"] == DELETED
            and state["updated_at"] <= self.purge_before
        )


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one batch of :meth:`Store.prune` did (or, in a dry run, would do).

    :param states: how many states of the type the batch examined.
    :param entries: history entries removed, those of purged states included.
    :param purged: ids of the deleted states removed whole.
    """

    states: int
    entries: int
    purged: tuple[str, ...] = ()


class VersionMismatch(Exception):
    """A compare-and-set lost: the stored version is not the expected one.

    Internal to the engine, which turns it into a retry or a
    :class:`~flask_statemanager.errors.StateConflictError`.
    """

    def __init__(self, state_id: str, actual_version: int | None) -> None:
        self.state_id = state_id
        self.actual_version = actual_version
        super().__init__(state_id, actual_version)


class LostRace(Exception):
    """Another writer got in the way of a batch, and no one state's version says
    which: two inserts of one new id, a deadlock or serialization failure, or
    a ``max_states`` count grown since the batch was planned. Nothing was
    written; the engine plans again from a fresh read (never a
    :class:`~flask_statemanager.errors.StateConflictError` for a state's
    ``expected_version``).

    :param error: what to raise if the retries run out (``None``: the engine's
        "kept changing" conflict).
    """

    def __init__(self, error: StateManagerError | None = None) -> None:
        self.error = error
        super().__init__(error)


class Store(ABC):
    """Persistence for states and their history."""

    #: Short name used in health checks and metrics (``"sql"``, ``"memory"``, ``"redis"``).
    kind: ClassVar[str]
    #: Lives with the app (SQLite file, memory): schema is created at ``init_app``.
    embedded: bool = False

    @property
    def component(self) -> str:
        """The backend's name in health checks, known without reaching it."""
        return self.kind

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
        :raises LostRace: another writer got in the way (see there); nothing
            was written.
        """

    @abstractmethod
    def scan(self, state_type: str | None = None, batch_size: int = 500) -> Iterator[list[State]]:
        """Every stored record, deleted and expired ones included, in batches (export).

        Optionally only those of *state_type*, in ``state_id`` order (the Redis
        store walks ``<prefix>:ids``; tombstones it already dropped are not
        seen). A write during the scan may or may not be seen.
        """

    @abstractmethod
    def restore(self, state: State, changes: Sequence[Change], *, replace: bool = False) -> None:
        """Write *state* and its history *changes* exactly as given: a restore, not a change.

        Versions, change ids, timestamps, actors, metadata and any further key
        a change carries are stored as they are; no history entry is added and
        no signal sent. The state and its history are written together or not
        at all. With *replace*, whatever the store holds for the id (record,
        history, index entries) is replaced in the same step.

        The documents must already be checked (:func:`~flask_statemanager.codec.check_document`,
        as :func:`~flask_statemanager.transfer.decode` does for an import): a
        store holds only checked documents, and a later write keeps a stored
        document without walking it again.

        :raises StateExistsError: the store already holds the id (a record or
            history) and *replace* is false; nothing was written.
        :raises StateValidationError: the history does not fit the state (see
            :func:`check_restore`); nothing was written.
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

    def stored_ids(self, state_ids: Sequence[str]) -> set[str]:
        """Which of *state_ids* the store holds anything of (a record or history).

        This default asks :meth:`get_many`: a store that keeps history after
        dropping a record (the Redis store's tombstones) overrides it.
        """
        return set(self.get_many(state_ids))

    @abstractmethod
    def count(self) -> int:
        """How many states are stored and neither deleted nor expired."""

    def estimate_count(self) -> tuple[int, bool]:
        """:meth:`count`, or a cheap estimate of it: ``(count, exact)``.

        The health check polls this, so it must stay cheap at millions of
        states; a store where :meth:`count` is not cheap returns an estimate
        and ``exact=False``. The default is the exact :meth:`count`.

        :raises BackendUnavailableError: the backend does not answer.
        """
        return self.count(), True

    @abstractmethod
    def count_type(self, type_name: str, limit: int | None = None) -> int:
        """How many states of *type_name* count against its ``max_states``, up to *limit*.

        Those are the stored states of the type not deleted nor expired by
        status (one whose TTL passed counts until its expiry is recorded).
        Counting stops at *limit*, so the cost is bounded by it. Called from
        inside :meth:`apply`'s plan, under the store's write lock where it
        has one: a store may then also serialise writers creating states of
        the type (PostgreSQL takes a transaction advisory lock).
        """

    @abstractmethod
    def prune(
        self,
        type_name: str,
        retention: Retention,
        *,
        batch_size: int = 500,
        dry_run: bool = False,
    ) -> Iterator[Pruned]:
        """Apply *retention* to every stored state of *type_name*, a batch at a time.

        Yields one :class:`Pruned` per batch of at most *batch_size* states;
        each batch commits on its own (an interrupted prune keeps what it
        did, and running it again finishes the work). Concurrent writes are
        safe: a batch holds the store's lock on its states while it decides
        and deletes. With *dry_run*, counts what would go and writes nothing.
        """

    @abstractmethod
    def type_size(self, type_name: str) -> int:
        """How many states of *type_name* are stored, tombstones included (prune's work)."""

    @abstractmethod
    def check(self) -> dict[str, Any]:
        """Probe the backend; return facts for the health report.

        :raises BackendUnavailableError: the backend does not answer.
        """

    @abstractmethod
    def rewrite(
        self, states: StateRewrite, changes: ChangeRewrite, *, batch_size: int = 500
    ) -> tuple[int, Iterator[int]]:
        """Maintenance: rewrite stored documents in place, batch by batch.

        Not a state change: no history entry is added, versions and timestamps
        stay. Used by ``flask states rotate-keys`` to re-encrypt. A state
        written by someone else between the read and the rewrite of its batch
        is left as that writer stored it. A cache in front drops what it holds
        of the rewritten states.

        :returns: how many units (records, or states with their history) there
            are to look at, and an iterator that does one batch per step and
            yields how many units it looked at.
        """

    @abstractmethod
    def reset(self) -> None:
        """Delete every state and history entry (tests and demos)."""

    def tally(self) -> Tally:
        """States by type and status (tombstones included) and history entries, for
        ``flask states stats``. This default walks :meth:`scan`; stores override it
        with their own aggregates."""
        tally = Tally()
        for batch in self.scan():
            for state in batch:
                tally.add(state["type"], state["status"])
                tally.history += len(self.history(state["state_id"]))
        return tally

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


def check_restore(state: State, changes: Sequence[Change]) -> None:
    """Refuse a history that cannot belong to *state*.

    Every change must name the state, versions must grow strictly and the
    last one be the state's version, and change ids must be distinct.

    :raises StateValidationError: saying which change is wrong.
    """
    state_id = state["state_id"]
    previous = 0
    seen: set[Any] = set()
    for n, change in enumerate(changes, 1):
        problem = None
        version: Any = change.get("version")
        if change.get("state_id") != state_id:
            problem = f"belongs to state {change.get('state_id')!r}"
        elif type(version) is not int or version <= previous:
            problem = f"has version {version!r}, not above the previous one ({previous})"
        elif change.get("change_id") in seen:
            problem = f"repeats change_id {change.get('change_id')!r}"
        if problem is not None:
            raise StateValidationError(
                f"State {state_id!r}: history entry {n} {problem}; a history lists the "
                "state's own changes, oldest first.",
                {"history": [problem]},
            )
        seen.add(change.get("change_id"))
        previous = version
    if changes and previous != state["version"]:
        raise StateValidationError(
            f"State {state_id!r} is at version {state['version']} but its last history "
            f"entry is version {previous}; export the state and its history together.",
            {"history": ["The last entry must carry the state's version."]},
        )


def restore_refused(state_id: str) -> StateExistsError:
    """The error of a restore without *replace* onto an id the store holds."""
    return StateExistsError(
        state_id,
        f"State {state_id!r} is already stored; restore it with replace=True "
        "(flask states import --replace) to overwrite it and its history.",
    )
