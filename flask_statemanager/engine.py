"""The one write pipeline.

Every mutation — register, update, patch, transition, delete, rollback,
atomic update, bulk operations, transactions, TTL expiry — goes through
:func:`commit` (:func:`write` for one operation):

1. **resolve**: read the stored row and decide whether it is live;
2. **validate**: build the candidate record, check the lifecycle rule, the JSON
   documents and limits, then run validators and transition guards;
3. **compare-and-set**: hand the store one :class:`~.stores.base.Write` per
   state (state row + history entry), committed together or not at all;
4. **after commit**: count it, log it, send signals and run callbacks.

A lost compare-and-set is retried from step 1 when the caller gave no
``expected_version`` (last write wins, but every write gets its own version
and history entry); with one, it is a :class:`StateConflictError`.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, overload

from . import codec
from .audit import seal
from .definitions import DELETED, EXPIRED, TypeDefinition, builtin_types
from .errors import (
    BackendUnavailableError,
    InvalidTransitionError,
    MigrationError,
    StateConflictError,
    StateExistsError,
    StateLimitError,
    StateManagerError,
    StateNotFoundError,
    StateValidationError,
)
from .events import Callbacks, Committed, dispatch, listeners
from .migrations import DEFAULT_VERSION, Migrations
from .records import Change, State, new_change_id, utcnow
from .stores.base import LostRace, VersionMismatch, Write
from .validation import Validator

if TYPE_CHECKING:
    from .extension import Runtime

logger = logging.getLogger("flask_statemanager")

_ID_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,255}")
_PAYLOAD_KEYS = frozenset({"name", "type", "data", "metadata"})
TTL_ACTOR = "ttl"


@dataclass
class Registry:
    """The global definitions: types, validators and callbacks (shared by every app)."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    types: dict[str, TypeDefinition] = field(default_factory=builtin_types)
    validators: dict[str, list[Validator]] = field(default_factory=dict)
    callbacks: Callbacks = field(default_factory=Callbacks)
    migrations: Migrations = field(default_factory=Migrations)

    def clear(self) -> None:
        with self.lock:
            self.types.clear()
            self.types.update(builtin_types())
            self.validators.clear()
            self.callbacks.clear()
            self.migrations.clear()

    def type(self, name: str) -> TypeDefinition:
        definition = self.types.get(name)
        if definition is None:
            raise StateValidationError(
                f"Unknown state type {name!r}; use one of {', '.join(sorted(self.types))} "
                f"or register it with register_type({name!r}).",
                {"type": [f"Unknown type {name!r}."]},
            )
        return definition


@dataclass(slots=True)
class Proposal:
    """What an operation wants to change; ``None`` keeps the current value."""

    transition: str
    data: dict[str, Any] | None = None
    name: str | None = None
    metadata: dict[str, Any] | None = None
    ttl: float | None = None
    note: dict[str, Any] | None = None
    #: A maintenance write (a data migration): no lifecycle rule applies and
    #: the status stays.
    maintenance: bool = False


#: Turns the current live record (``None`` for a new state) into a proposal.
Builder = Callable[[State | None], Proposal]


def check_state_id(state_id: Any) -> str:
    """Return *state_id* if valid, else raise :class:`StateValidationError`."""
    if isinstance(state_id, str) and _ID_RE.fullmatch(state_id):
        return state_id
    raise StateValidationError(
        f"Invalid state_id {state_id!r}: use 1-255 characters from letters, digits and _ . : @ -",
        {"state_id": ["1-255 characters of [A-Za-z0-9_.:@-]."]},
    )


def check_ttl(ttl: Any) -> float | None:
    """Return *ttl* seconds if valid (``None`` allowed), else raise."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < 10**9:
        raise StateValidationError(
            f"ttl must be a positive number of seconds, got {ttl!r}.",
            {"ttl": ["A positive number of seconds."]},
        )
    return float(ttl)


def parse_payload(payload: Any, argument: str, type_name: str | None) -> Proposal:
    """Check seed-002 structure ``{"name", "type", "data", "metadata"}`` into a proposal."""
    if not isinstance(payload, dict):
        raise StateValidationError(
            f"{argument} must be a dict like {{'name': ..., 'data': {{...}}, "
            f"'metadata': {{...}}}}, got {type(payload).__name__}.",
            {argument: ["Must be a dict."]},
        )
    unknown = () if _PAYLOAD_KEYS.issuperset(payload) else set(payload) - _PAYLOAD_KEYS
    if unknown:
        names = sorted(map(repr, unknown))  # keys may be anything, not only text
        raise StateValidationError(
            f"{argument} has unknown keys [{', '.join(names)}]; it takes name, type, data and "
            "metadata — put your fields under 'data'.",
            {argument: [f"Unknown keys: {', '.join(names)}."]},
        )
    given_type = payload.get("type")
    if given_type is not None and type_name is not None:
        given = getattr(given_type, "value", given_type)
        if given != type_name:
            raise StateValidationError(
                f"{argument}['type'] is {given!r} but the state type is {type_name!r}; "
                "remove it or make them match.",
                {"type": [f"Does not match {type_name!r}."]},
            )
    name = payload.get("name")
    if name is not None:
        codec.check_text(name, "name")
    return Proposal("update", data=payload.get("data"), name=name, metadata=payload.get("metadata"))


@dataclass(slots=True)
class Operation:
    """One requested change of one state, as :func:`commit` receives it.

    :param build: turns the current live record (``None`` for a new state) into
        a :class:`Proposal`.
    :param create_type: set for ``register_state``: the id must not be live.
    :param expected_version: compare-and-set against this version; a mismatch
        raises :class:`StateConflictError` and nothing is written.
    """

    state_id: str
    build: Builder
    create_type: str | None = None
    expected_version: int | None = None
    actor: str | None = None
    #: The transition name, for logs and metrics before the proposal is built.
    transition: str = "update"

    def __post_init__(self) -> None:
        version = self.expected_version
        if version is not None and (type(version) is not int or version < 1):
            raise StateValidationError(
                f"expected_version must be a positive integer, got {version!r}.",
                {"expected_version": ["A positive integer (the state's version or etag)."]},
            )
        if self.actor is not None:
            codec.check_text(self.actor, "actor")


#: What :func:`commit` returns per operation: the new record, or (when
#: ``partial``) the error that kept this operation out.
Outcome = State | StateManagerError


def commit(
    registry: Registry,
    runtime: Runtime,
    operations: Sequence[Operation],
    *,
    partial: bool = False,
    attempts: int | None = None,
) -> list[Outcome]:
    """Run operations through the pipeline as one unit and return their outcomes.

    Operations apply in order, each on the result of the ones before it (two
    operations may touch one state); all of them commit in one store
    transaction, with one history entry each.

    :param partial: an operation that fails validation is left out and its
        error returned in its place, and the others commit; otherwise the first
        error is raised and nothing is written.
    :param attempts: how often a lost compare-and-set is retried from a fresh
        read (last write wins); defaults to ``STATEMANAGER_WRITE_RETRIES``.
    """
    attempts = attempts or runtime.settings.write_retries
    state_ids = (
        [operations[0].state_id]
        if len(operations) == 1
        else list(dict.fromkeys(op.state_id for op in operations))
    )
    committed: list[tuple[Write, State | None]] = []
    outcomes: list[Outcome] = []
    rejected: list[tuple[str, StateManagerError]] = []  # (state type, error): metrics

    encryption = runtime.encryption

    def plan(rows: Mapping[str, State | None], heads: Mapping[str, str | None]) -> list[Write]:
        committed.clear()
        outcomes.clear()
        rejected.clear()
        now = utcnow()
        # Decrypting is the first step after the store's read.
        current = {i: None if r is None else encryption.open_state(r) for i, r in rows.items()}
        limits = Limits(registry, runtime)
        # Every limited type the batch may create in, locked (and counted) in
        # sorted order, so two batches never wait on each other's types.
        limits.prepare(op.create_type for op in operations if op.create_type is not None)
        for op in operations:
            try:
                writes = _plan_one(registry, runtime, op, current.get(op.state_id), now, limits)
            except StateManagerError as exc:
                if isinstance(exc, _REJECTIONS):
                    rejected.append((_type_of(registry, op, current.get(op.state_id)), exc))
                if not partial:
                    raise
                outcomes.append(exc)
                continue
            committed.extend(writes)
            current[op.state_id] = writes[-1][0].state
            outcomes.append(writes[-1][0].state)
        seal([w.change for w, _ in committed], heads)
        # Encrypting is the last step before the store writes; everything above
        # (and signals and callbacks after the commit) works on plaintext.
        return [encryption.seal_write(w) for w, _ in committed]

    given_up: StateManagerError | None = None  # what a lost race raises when retries run out
    for attempt in range(attempts):
        try:
            runtime.store.apply(state_ids, plan)
        except LostRace as lost:
            # Another writer got in the way of the batch as a whole: plan again.
            given_up = lost.error
            _back_off(attempt, attempts)
            continue
        except VersionMismatch as lost:
            # Only stores without locks get here: another writer won the race.
            expected = next(
                (op.expected_version for op in operations if op.state_id == lost.state_id),
                None,
            )
            if expected is not None:
                raise StateConflictError(lost.state_id, expected, lost.actual_version) from None
            given_up = None
            _back_off(attempt, attempts)
            continue
        except StateManagerError:
            _count_rejections(runtime, rejected)
            raise
        _count_rejections(runtime, rejected)
        after_commit(registry, runtime, committed)
        return list(outcomes)
    if given_up is not None:
        raise given_up
    raise StateConflictError(
        state_ids[0] if state_ids else "",
        None,
        None,
        message=f"State {', '.join(map(repr, state_ids))} kept changing under {attempts} "
        "attempts to write it; retry later or pass a larger retries.",
    )


def _back_off(attempt: int, attempts: int) -> None:
    """Sleep with jitter before another attempt, so racing writers stop colliding."""
    if attempt + 1 < attempts:
        time.sleep(random.uniform(0, min(0.1, 0.001 * 2**attempt)))


#: Errors that count as a rejected change in the metrics.
_REJECTIONS = (StateValidationError, InvalidTransitionError, StateLimitError)


def _type_of(registry: Registry, op: Operation, row: State | None) -> str:
    """The state type an operation targets, for metric labels (never arbitrary input)."""
    name = op.create_type if op.create_type is not None else (row["type"] if row else None)
    return name if name in registry.types else "unknown"


def _count_rejections(runtime: Runtime, rejected: Sequence[tuple[str, StateManagerError]]) -> None:
    for state_type, exc in rejected:
        runtime.metrics.rejected(state_type, type(exc).__name__)


def write(
    registry: Registry, runtime: Runtime, operation: Operation, *, attempts: int | None = None
) -> State:
    """Run one operation through the pipeline and return the committed record."""
    (state,) = commit(registry, runtime, [operation], attempts=attempts)
    assert isinstance(state, State)
    return state


def _plan_one(
    registry: Registry,
    runtime: Runtime,
    op: Operation,
    row: State | None,
    now: datetime,
    limits: Limits | None = None,
) -> list[tuple[Write, State | None]]:
    """The writes of one operation on *row* (the stored record, or the batch's latest)."""
    state_id = op.state_id
    live = row if row is not None and is_live(row, now) else None
    if op.create_type is not None and live is not None:
        raise StateExistsError(state_id)
    if op.create_type is None and live is None:
        raise StateNotFoundError(state_id)
    version = live["version"] if live else None
    if op.expected_version is not None and version != op.expected_version:
        raise StateConflictError(state_id, op.expected_version, version)
    writes: list[tuple[Write, State | None]] = []
    base = row
    if row is not None and live is None and needs_expiry(row, now):
        # A new life over a state whose TTL passed unrecorded: record the expiry first.
        writes.append((expiry_write(row, now), row))
        base = writes[-1][0].state
    # Plan from the record as reads return it: upgraded to the newest schema.
    try:
        upgraded, migrated_from = (
            registry.migrations.upgrade(live) if live is not None else (None, None)
        )
    except MigrationError:
        if op.transition != "delete":
            raise
        upgraded, migrated_from = live, None  # a broken migration never blocks a delete
    proposal = op.build(upgraded)
    if migrated_from is not None:
        assert upgraded is not None
        note = {"migrated_from": migrated_from, "migrated_to": upgraded["metadata"]["version"]}
        proposal = replace(proposal, note={**(proposal.note or {}), **note})
    new_state, change = _prepare(
        registry, runtime, state_id, op.create_type, upgraded, base, proposal, op.actor, now
    )
    if migrated_from is not None:
        assert live is not None
        change = Change(change, old_data=live["data"])  # the history keeps what was stored
    limit = None
    if op.create_type is not None:
        limit = (limits or Limits(registry, runtime)).admit(op.create_type, state_id, row)
    elif limits is not None and live is not None and new_state["status"] in (DELETED, EXPIRED):
        limits.release(live["type"])  # a later creation in the batch may take its place
    writes.append((Write(new_state, base["version"] if base else 0, change, limit), upgraded))
    return writes


class Limits:
    """The ``max_states`` checks of one plan: counts read once per type, creations added.

    A state counts against its type's limit unless deleted or expired by
    status. The store counts under its write lock where that covers every
    writer of the type (memory, SQLite, and PostgreSQL through an advisory
    lock per type); Redis checks again in its commit script.

    Counts are bounded (a type far over a lowered limit is not counted
    whole): the bound is the limit plus one plus the states the batch
    releases, so a batch deleting states of a type over its limit can never
    create more than it leaves room for.
    """

    def __init__(self, registry: Registry, runtime: Runtime) -> None:
        self._registry = registry
        self._runtime = runtime
        #: Per type: the count read and the bound it was read with (a count
        #: that reached its bound may be more).
        self._read: dict[str, tuple[int, int]] = {}
        self._created: dict[str, int] = {}
        self._released: dict[str, int] = {}

    def maximum(self, type_name: str) -> int | None:
        """The ``max_states`` of *type_name*, or the global one, or ``None``."""
        own = self._registry.type(type_name).max_states
        return own if own is not None else self._runtime.settings.max_states_per_type

    def prepare(self, type_names: Iterable[str]) -> None:
        """Count the limited types among *type_names* now, in sorted order.

        The store locks each type as it counts it (PostgreSQL's advisory
        locks): sorted, two batches creating in the same types take them in
        the same order and never deadlock. Unknown types are left to the
        operation naming them, which reports them.
        """
        for type_name in sorted(set(type_names)):
            if type_name in self._registry.types:
                maximum = self.maximum(type_name)
                if maximum is not None:
                    self._count(type_name, maximum)

    def _count(self, type_name: str, maximum: int) -> int:
        """The type's count as this batch leaves it so far: stored, plus created, less released."""
        released = self._released.get(type_name, 0)
        bound = maximum + 1 + released  # enough to tell whether one more fits
        read = self._read.get(type_name)
        if read is None or (read[0] >= read[1] and read[1] < bound):
            read = (self._runtime.store.count_type(type_name, bound), bound)
            self._read[type_name] = read
        return read[0] + self._created.get(type_name, 0) - released

    def admit(self, type_name: str, state_id: str, row: State | None) -> int | None:
        """Count one more state of *type_name*; return its limit (``None``: unlimited).

        :param row: the stored record the new state replaces, if any: one of
            the same type that still counts (its TTL passed unrecorded) is
            replaced, not added.
        :raises StateLimitError: the type is full; nothing is written.
        """
        maximum = self.maximum(type_name)
        if maximum is None:
            return None
        replaced = row is not None and row["type"] == type_name
        replaced = replaced and row["status"] not in (DELETED, EXPIRED)  # type: ignore[index]
        count = self._count(type_name, maximum) + (0 if replaced else 1)
        if count > maximum:
            raise StateLimitError(
                f"Cannot create {state_id!r}: type {type_name!r} is at its limit of {maximum} "
                "states (max_states or STATEMANAGER_MAX_STATES_PER_TYPE); delete states of "
                "this type or raise the limit.",
                limit="states",
                value=count,
                maximum=maximum,
            )
        if not replaced:
            self._created[type_name] = self._created.get(type_name, 0) + 1
        return maximum

    def release(self, type_name: str) -> None:
        """Count one state of *type_name* less (the batch deletes or expires it)."""
        if self.maximum(type_name) is not None:
            self._released[type_name] = self._released.get(type_name, 0) + 1


def _prepare(
    registry: Registry,
    runtime: Runtime,
    state_id: str,
    create_type: str | None,
    live: State | None,
    base: State | None,
    proposal: Proposal,
    actor: str | None,
    now: datetime,
) -> tuple[State, Change]:
    """Validate a proposal against the current state; return the new record and its change."""
    settings = runtime.settings
    type_name = create_type if create_type is not None else live["type"]  # type: ignore[index]
    definition = registry.type(type_name)
    status = live["status"] if live is not None else None
    if proposal.maintenance:
        target: str | None = None
    else:
        target = definition.lifecycle.rule(proposal.transition, status, type_name).target

    # A migration's output is checked like new input.
    checked = "migrated_from" not in (proposal.note or {})
    data, size = _document(proposal.data, live, "data", settings.max_depth, checked=checked)
    metadata, more = _document(
        proposal.metadata, live, "metadata", settings.max_depth, checked=checked
    )
    size += more
    if live is None:
        # New records are written in the type's newest data shape.
        newest = registry.migrations.latest(type_name) or DEFAULT_VERSION
        metadata = {"version": newest, **metadata}
    elif "version" not in metadata and "version" in live["metadata"]:
        # Replacing metadata does not reset the record's schema version.
        metadata = {**metadata, "version": live["metadata"]["version"]}
    if size > settings.max_state_bytes:
        raise StateLimitError(
            f"State {state_id!r} would be {size} bytes, over the {settings.max_state_bytes}-byte "
            "limit (STATEMANAGER_MAX_STATE_BYTES); store large blobs elsewhere and keep a "
            "reference in the state.",
            limit="size",
            value=size,
            maximum=settings.max_state_bytes,
        )

    ttl = (
        proposal.ttl
        if proposal.ttl is not None
        else (definition.default_ttl if live is None else None)
    )
    if ttl is not None:
        expires_at: datetime | None = now + timedelta(seconds=ttl)
    else:
        expires_at = live["expires_at"] if live is not None else None
    version = (base["version"] if base is not None else 0) + 1
    new_status = target if target is not None else status
    assert new_status is not None  # Lifecycle makes "create" name its status
    state = State.from_columns(
        state_id=state_id,
        name=proposal.name or (live["name"] if live else state_id),
        type=type_name,
        status=new_status,
        data=data,
        metadata=metadata,
        version=version,
        created_at=live["created_at"] if live else now,
        updated_at=now,
        expires_at=expires_at,
    )
    data_changed = (
        proposal.data is not None
        or proposal.metadata is not None
        or live is None
        or "migrated_from" in (proposal.note or {})  # a migration rewrote the data
    )
    validators = registry.validators.get(type_name, [])
    if definition.validator is not None:
        validators = [definition.validator, *validators]
    for validator in validators:
        if validator.applies_to(proposal.transition, data_changed):
            validator(state, proposal.transition)
    change = Change(
        change_id=new_change_id(),
        state_id=state_id,
        version=version,
        transition=proposal.transition,
        old_data=live["data"] if live else None,
        new_data=None if new_status == DELETED else data,
        actor=actor,
        metadata={"from_status": status, "to_status": new_status, **(proposal.note or {})},
        created_at=now,
        hash=None,  # sealed with the batch, see audit.seal
    )
    return state, change


def _document(
    given: dict[str, Any] | None,
    live: State | None,
    field: str,
    max_depth: int,
    *,
    checked: bool,
) -> tuple[dict[str, Any], int]:
    """The checked *field* document of the new record (*given*, else the live
    one's) and its encoded size.

    A document kept from *live* as the store holds it (*checked*: no migration
    rewrote it) was checked when it was written: only its size is taken again.
    """
    if given is None and live is not None:
        if checked:
            kept: dict[str, Any] = live[field]
            return kept, len(codec.dumps(kept))
        given = live[field]
    return codec.check_document({} if given is None else given, field, max_depth=max_depth)


def is_live(row: State, now: datetime) -> bool:
    """Neither deleted nor expired (by status or by TTL): what reads return."""
    return row["status"] not in (DELETED, EXPIRED) and not row.is_expired(now)


def needs_expiry(row: State, now: datetime) -> bool:
    """TTL passed but the EXPIRE change is not recorded yet."""
    return row.is_expired(now) and row["status"] not in (DELETED, EXPIRED)


def expiry_write(row: State, now: datetime) -> Write:
    """The EXPIRE change the TTL sweeper (or a lazy read) records for *row*.

    TTL expiry is a fact, not a request: it applies from any live status,
    whatever the type's lifecycle says.
    """
    version = row["version"] + 1
    state = State(row, status=EXPIRED, version=version, etag=str(version), updated_at=now)
    change = Change(
        change_id=new_change_id(),
        state_id=row["state_id"],
        version=version,
        transition="expire",
        old_data=row["data"],
        new_data=row["data"],
        actor=TTL_ACTOR,
        metadata={"from_status": row["status"], "to_status": EXPIRED, "reason": "ttl"},
        created_at=now,
        hash=None,  # sealed by the caller's plan, see audit.seal
    )
    return Write(state, row["version"], change)


def expire(registry: Registry, runtime: Runtime, state_id: str) -> State | None:
    """Record the TTL expiry of a state; ``None`` if it is not due (or another worker did it)."""
    committed: list[tuple[Write, State | None]] = []

    def plan(rows: Mapping[str, State | None], heads: Mapping[str, str | None]) -> list[Write]:
        committed.clear()  # a store may plan again from a fresher read
        row, now = rows[state_id], utcnow()
        if row is None or not needs_expiry(row, now):
            return []
        row = runtime.encryption.open_state(row)
        committed.append((expiry_write(row, now), row))
        seal([committed[0][0].change], heads)
        return [runtime.encryption.seal_write(committed[0][0])]

    try:
        runtime.store.apply([state_id], plan)
    except (VersionMismatch, LostRace):
        return None  # another worker recorded it, or will on a later sweep
    after_commit(registry, runtime, committed)
    return committed[0][0].state if committed else None


def sweep(registry: Registry, runtime: Runtime, limit: int) -> int:
    """Record the EXPIRE change of up to *limit* states whose TTL passed; return how many.

    Each expiry is decided under the store's lock from a fresh read, so workers
    sweeping at once record every expiry exactly once. A state that cannot be
    expired (say its ciphertext opens with no configured key) does not hold up
    the others: each failure is logged, the rest are recorded, then the first
    failure is raised.
    """
    due = runtime.store.expired(utcnow(), limit)
    recorded = 0
    failures: list[StateManagerError] = []
    for row in due:
        try:
            recorded += expire(registry, runtime, row["state_id"]) is not None
        except BackendUnavailableError:
            raise  # the store is down: the other rows would only wait on it too
        except StateManagerError as exc:
            logger.error("Could not record the expiry of state %r: %s", row["state_id"], exc)
            failures.append(exc)
    if failures:
        raise failures[0]
    return recorded


def after_commit(
    registry: Registry, runtime: Runtime, committed: Sequence[tuple[Write, State | None]]
) -> None:
    """Count, then signal and call back, each committed write in commit order.

    :param committed: each write with the live record it replaced (``None`` on create).
    """
    for w, old in committed:
        state, change = w.state, w.change
        runtime.metrics.committed(
            state["type"],
            change["transition"],
            change["metadata"].get("from_status"),
            change["metadata"].get("to_status"),
        )
        sent, matched = listeners(registry.callbacks, state["type"], change["transition"])
        if not sent and not matched:
            continue
        # Listeners get the records as get_state returns them: an expiry
        # records the stored shape, which a migration upgrades on read.
        old, state = _as_read(registry, old), _as_read(registry, state)
        transition = change["transition"]
        event = Committed(state["state_id"], state["type"], transition, old, state, change)
        dispatch(runtime, event, sent, matched)


@overload
def _as_read(registry: Registry, record: State) -> State: ...
@overload
def _as_read(registry: Registry, record: None) -> None: ...
def _as_read(registry: Registry, record: State | None) -> State | None:
    """*record* upgraded to its type's newest schema (as stored if a migration fails)."""
    if record is None:
        return None
    try:
        return registry.migrations.upgrade(record)[0]
    except MigrationError:
        return record
