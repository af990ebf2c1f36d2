"""Data migrations: records upgrade to their type's newest schema version.

``metadata["version"]`` is a record's schema version. Migrations are
registered per type, each from one version to a higher one::

    def split_name(data):
        first, _, last = data.pop("name", "").partition(" ")
        return {**data, "first_name": first, "last_name": last}

    state_manager.register_migration("user", "1.0", "2.0", split_name)

A migration function takes a private copy of the record's ``data`` and
returns the new ``data`` (a dict); the version in ``metadata`` is set by the
manager. Versions compare as versions (:class:`packaging.version.Version`:
``"1.10" > "1.9"``, ``"2" == "2.0"``).

Records upgrade **on read**, in memory (reads never write): from the record's
version, the migration whose range covers it (the highest ``from_version``
at or below it with ``to_version`` above it) runs, then the next from its
result, until no migration applies. Writes plan from the upgraded record, so
the next change of a state stores it upgraded; its history entry keeps the
stored ``old_data`` and notes ``migrated_from`` / ``migrated_to``. New
records are created at the newest version. :func:`migrate_stored` (``flask
states migrate``) upgrades every stored record through the write pipeline.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from packaging.version import InvalidVersion, Version

from .definitions import DELETED, EXPIRED
from .errors import (
    ConfigurationError,
    MigrationError,
    StateConflictError,
    StateManagerError,
    StateNotFoundError,
)
from .query import Query, parse_order
from .records import State, utcnow

if TYPE_CHECKING:
    from .engine import Registry
    from .extension import Runtime

#: ``fn(data) -> new data``.
MigrationFunction = Callable[[dict[str, Any]], dict[str, Any]]
#: The schema version of records that carry none.
DEFAULT_VERSION = "1.0"
#: Actor of the changes ``flask states migrate`` writes.
MIGRATION_ACTOR = "migration"


@dataclass(frozen=True, slots=True)
class Migration:
    """One registered step of a type's data."""

    source: Version
    target: Version
    from_version: str
    to_version: str
    fn: MigrationFunction


def parse_version(value: Any, what: str) -> Version:
    """A version string (or number) as a :class:`Version`.

    :raises ConfigurationError: not a version like ``"1.0"``.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigurationError(f"{what} must be a version string like '1.0', got {value!r}.")
    try:
        return Version(str(value))
    except InvalidVersion:
        raise ConfigurationError(
            f"{what} {value!r} is not a version; use dotted numbers like '1.0' or '2.1'."
        ) from None


class Migrations:
    """The registered migrations of every type (part of the global registry)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_type: dict[str, list[Migration]] = {}

    def register(self, type_name: str, from_version: Any, to_version: Any, fn: Any) -> None:
        """Add (or replace) the migration of *type_name* starting at *from_version*."""
        source = parse_version(from_version, "from_version")
        target = parse_version(to_version, "to_version")
        if target <= source:
            raise ConfigurationError(
                f"to_version {to_version!r} must be higher than from_version {from_version!r}."
            )
        if not callable(fn):
            raise ConfigurationError(
                f"A migration is a function taking data and returning the new data, got {fn!r}."
            )
        step = Migration(source, target, str(from_version), str(to_version), fn)
        with self._lock:
            steps = [m for m in self._by_type.get(type_name, []) if m.source != source]
            self._by_type[type_name] = sorted([*steps, step], key=lambda m: m.source)

    def clear(self) -> None:
        with self._lock:
            self._by_type.clear()

    def types(self) -> list[str]:
        """The types that have migrations, sorted."""
        return sorted(self._by_type)

    def latest(self, type_name: str) -> str | None:
        """The newest version a migration of *type_name* leads to, or ``None``."""
        steps = self._by_type.get(type_name)
        if not steps:
            return None
        return max(steps, key=lambda m: m.target).to_version

    def _step(self, steps: Sequence[Migration], current: Version) -> Migration | None:
        for step in reversed(steps):
            if step.source <= current < step.target:
                return step
        return None

    def needs_upgrade(self, state: State) -> bool:
        """Whether a migration applies to *state* (which is then read upgraded)."""
        steps = self._by_type.get(state["type"])
        if not steps:
            return False
        return self._step(steps, self._version_of(state)) is not None

    def _version_of(self, state: State) -> Version:
        raw = state["metadata"].get("version", DEFAULT_VERSION)
        try:
            return Version(str(raw))
        except InvalidVersion:
            raise MigrationError(
                f"State {state['state_id']!r} has schema version {raw!r} in metadata, which is "
                "not a version; fix its metadata['version'] (e.g. to '1.0').",
                state_id=state["state_id"],
                from_version=str(raw),
                to_version=None,
            ) from None

    def upgrade(self, state: State) -> tuple[State, str | None]:
        """*state* upgraded to its type's newest version, and the version it started from.

        Returns *state* itself and ``None`` when no migration applies.

        :raises MigrationError: a migration raised or returned no dict.
        """
        steps = self._by_type.get(state["type"])
        if not steps:
            return state, None
        current = self._version_of(state)
        start = str(state["metadata"].get("version", DEFAULT_VERSION))
        data = state["data"]
        reached: str | None = None
        while (step := self._step(steps, current)) is not None:
            where = (
                f"Migrating state {state['state_id']!r} (type {state['type']!r}) from schema "
                f"version {step.from_version} to {step.to_version}"
            )
            try:
                result = step.fn(copy.deepcopy(data))
            except Exception as exc:
                raise MigrationError(
                    f"{where} failed: {type(exc).__name__}: {exc}. Fix the function registered "
                    f"with register_migration({state['type']!r}, {step.from_version!r}, "
                    f"{step.to_version!r}, ...).",
                    state_id=state["state_id"],
                    from_version=step.from_version,
                    to_version=step.to_version,
                ) from exc
            if not isinstance(result, dict):
                raise MigrationError(
                    f"{where}: the migration returned {type(result).__name__}, not the new data "
                    "dict.",
                    state_id=state["state_id"],
                    from_version=step.from_version,
                    to_version=step.to_version,
                )
            data, current, reached = result, step.target, step.to_version
        if reached is None:
            return state, None
        return State(state, data=data, metadata={**state["metadata"], "version": reached}), start


@dataclass
class MigrationRun:
    """What :func:`migrate_stored` does, step by step.

    :param total: live states of the types to migrate (for a progress bar).
    :param batches: the iterator that migrates one batch per step and yields
        how many states it looked at.
    """

    total: int
    batches: Iterator[int]
    #: States written upgraded so far.
    upgraded: int = 0
    #: States already at the newest version, left alone.
    current: int = 0


def migrate_stored(
    registry: Registry, runtime: Runtime, types: Sequence[str], batch_size: int
) -> MigrationRun:
    """Upgrade every stored live state of *types* through the write pipeline.

    States are read *batch_size* at a time (:meth:`.Store.scan`); those below
    the newest version are written back upgraded in one commit per batch, each
    as an ``update`` change with actor ``"migration"`` and a compare-and-set on
    the version read, so a user's concurrent write is never lost (that state
    is read again and, if still old, migrated again). Records already at the
    newest version are skipped, so a run that was interrupted continues where
    it stopped when started again.
    """
    from .engine import Operation, Proposal, commit

    store, encryption = runtime.store, runtime.encryption
    total = 0
    for type_name in types:
        _items, count = store.query(Query(type_name, (), parse_order("state_id"), 0, 1, utcnow()))
        total += count

    def build(current: State | None) -> Proposal:
        assert current is not None  # the pipeline passes the upgraded live record
        return Proposal(
            "update", data=current["data"], metadata=current["metadata"], maintenance=True
        )

    def write(rows: Sequence[State]) -> None:
        todo = list(rows)
        for _attempt in range(20):
            if not todo:
                return
            operations = [
                Operation(
                    row["state_id"],
                    build,
                    expected_version=row["version"],
                    actor=MIGRATION_ACTOR,
                    transition="update",
                )
                for row in todo
            ]
            outcomes = commit(registry, runtime, operations, partial=True)
            retry: list[str] = []
            for row, outcome in zip(todo, outcomes, strict=True):
                if isinstance(outcome, StateConflictError):
                    retry.append(row["state_id"])  # written meanwhile: look again
                elif isinstance(outcome, StateNotFoundError):
                    continue  # deleted or expired meanwhile: nothing to upgrade
                elif isinstance(outcome, StateManagerError):
                    if isinstance(outcome, MigrationError):
                        raise outcome
                    raise MigrationError(
                        f"State {row['state_id']!r} could not be written upgraded: {outcome}",
                        state_id=row["state_id"],
                        from_version=str(row["metadata"].get("version", DEFAULT_VERSION)),
                        to_version=registry.migrations.latest(row["type"]),
                    ) from outcome
                else:
                    run.upgraded += 1
            fresh = store.get_many(retry) if retry else {}
            todo = []
            for state_id in retry:
                stored = fresh.get(state_id)
                if stored is None:
                    continue  # deleted meanwhile
                again = encryption.open_state(stored)
                if registry.migrations.needs_upgrade(again):
                    todo.append(again)
                else:
                    run.current += 1
        raise StateConflictError(
            todo[0]["state_id"],
            None,
            None,
            message=f"State {todo[0]['state_id']!r} kept changing while being migrated; "
            "run `flask states migrate` again.",
        )

    def batches() -> Iterator[int]:
        for type_name in types:
            # Every stored record of the type in id order, a batch at a time;
            # deleted and expired ones are left alone.
            for found in store.scan(type_name, batch_size):
                now = utcnow()
                rows = [
                    encryption.open_state(r)
                    for r in found
                    if r["status"] not in (DELETED, EXPIRED) and not r.is_expired(now)
                ]
                pending = [r for r in rows if registry.migrations.needs_upgrade(r)]
                run.current += len(rows) - len(pending)
                write(pending)
                if rows:
                    yield len(rows)

    run = MigrationRun(total, batches())
    return run
