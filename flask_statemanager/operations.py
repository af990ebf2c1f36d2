"""The public operations of :class:`~flask_statemanager.StateManager`.

Reads go straight to the store; every mutation builds a
:class:`~.engine.Proposal` and hands it to :func:`.engine.write`, the one
pipeline. Each operation is timed, counted and logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from . import audit, mutations, retention
from .audit import BrokenLink
from .definitions import (
    DEFAULT_LIFECYCLE,
    DELETED,
    Lifecycle,
    LifecycleTable,
    StateTransition,
    TransitionLike,
    TypeDefinition,
    TypeLike,
    check_field_path,
    normalize_transition,
    normalize_type,
)
from .encryption import check_encrypted_fields
from .engine import (
    Operation,
    Outcome,
    Proposal,
    Registry,
    check_state_id,
    check_ttl,
    commit,
    expire,
    is_live,
    needs_expiry,
    sweep,
    write,
)
from .errors import (
    BackendUnavailableError,
    ConfigurationError,
    StateManagerError,
    StateNotFoundError,
)
from .errors import StateValidationError as _Invalid
from .events import Callback
from .metrics import log_state_operation
from .migrations import MigrationRun, migrate_stored
from .query import Page, Query, check_paging, parse_conditions, parse_order
from .records import Change, State, isoformat, utcnow
from .stores.base import Pruned, Store
from .transactions import BulkResult, Transaction
from .validation import Validator, ValidatorLike

if TYPE_CHECKING:
    from .extension import Runtime


class _Timed:
    """Times one public call, then counts it (with its error class) and logs it.

    A class rather than ``@contextmanager``: it wraps every call, and this is
    the cheaper form.
    """

    __slots__ = ("runtime", "name", "state_id", "transition", "start")

    def __init__(
        self, runtime: Runtime, name: str, state_id: str | None, transition: str | None
    ) -> None:
        self.runtime = runtime
        self.name = name
        self.state_id = state_id
        self.transition = transition

    def __enter__(self) -> Runtime:
        self.start = time.perf_counter()
        return self.runtime

    def __exit__(self, kind: type[BaseException] | None, exc: object, tb: object) -> None:
        duration_ms = (time.perf_counter() - self.start) * 1000
        # Any exception fails the call, except a generator's consumer stopping early.
        error = None if kind is None or kind is GeneratorExit else kind.__name__
        self.runtime.metrics.observe(self.name, duration_ms, error)
        log_state_operation(self.name, self.state_id, self.transition, duration_ms, error=error)


class StateOperations:
    """Mixin holding every state operation; the singleton provides the runtime."""

    _registry: Registry

    def _runtime(self) -> Runtime:  # pragma: no cover - provided by StateManager
        raise ConfigurationError("StateOperations needs a runtime")

    def _operation(
        self, name: str, state_id: str | None = None, transition: str | None = None
    ) -> _Timed:
        """``with self._operation(...) as runtime:`` times, counts and logs the call."""
        return _Timed(self._runtime(), name, state_id, transition)

    # -- definitions ----------------------------------------------------------

    @property
    def store(self) -> Store:
        """The store of the current app."""
        return self._runtime().store

    def register_type(
        self,
        name: TypeLike,
        *,
        default_ttl: float | None = None,
        schema: ValidatorLike | None = None,
        indexes: Sequence[str] = (),
        lifecycle: LifecycleTable | Lifecycle | None = None,
        encrypted_fields: Sequence[str] = (),
        keep_history: int | None = None,
        keep_history_for: float | None = None,
        purge_deleted_after: float | None = None,
        max_states: int | None = None,
    ) -> TypeDefinition:
        """Define (or redefine) a state type.

        :param name: lower-case name such as ``"cart"``, or a :class:`StateType`.
        :param default_ttl: seconds a new state of this type lives unless given a ``ttl``.
        :param schema: a marshmallow schema (or validator callable) applied to ``data``.
        :param indexes: dotted fields (``"data.status"``) to index for search; each
            becomes a composite expression index ``(type, field, state_id)``.
        :param lifecycle: ``{transition: (from statuses, to status)}`` replacing the
            default table; ``None`` as *from* marks creation, ``"*"`` any status.
        :param encrypted_fields: dotted fields (``"data.ssn"``) stored encrypted
            with ``STATEMANAGER_ENCRYPTION_KEYS`` (see :doc:`/encryption`); they
            cannot be indexed nor filtered on.
        :raises ConfigurationError: a field path is malformed, or an index
            covers an encrypted field.
        :param keep_history: :meth:`prune` keeps at least the newest *keep_history*
            history entries of each state (see :doc:`retention`).
        :param keep_history_for: :meth:`prune` keeps every history entry younger
            than this many seconds. With both, an entry goes only when both let it.
        :param purge_deleted_after: :meth:`prune` removes a deleted state, tombstone
            and history, this many seconds after its deletion (default:
            ``STATEMANAGER_PURGE_DELETED_AFTER``).
        :param max_states: most live states of this type; registering one more
            raises :class:`StateLimitError` (default:
            ``STATEMANAGER_MAX_STATES_PER_TYPE``).
        """
        type_name = normalize_type(name)
        keep_history = retention.check_count("keep_history", keep_history)
        keep_history_for = retention.check_seconds("keep_history_for", keep_history_for)
        purge_deleted_after = retention.check_seconds("purge_deleted_after", purge_deleted_after)
        max_states = retention.check_count("max_states", max_states)
        for field in indexes:
            check_field_path(field)
        secret = check_encrypted_fields(encrypted_fields, indexes)
        if isinstance(lifecycle, Mapping):
            lifecycle = Lifecycle(lifecycle)
        definition = TypeDefinition(
            type_name,
            lifecycle=lifecycle or DEFAULT_LIFECYCLE,
            default_ttl=check_ttl(default_ttl),
            indexes=tuple(dict.fromkeys(indexes)),
            validator=None if schema is None else Validator(schema),
            encrypted_fields=secret,
            keep_history=keep_history,
            keep_history_for=keep_history_for,
            purge_deleted_after=purge_deleted_after,
            max_states=max_states,
        )
        with self._registry.lock:
            self._registry.types[type_name] = definition
        return definition

    def get_type(self, name: TypeLike) -> TypeDefinition:
        """The definition of a registered type."""
        return self._registry.type(normalize_type(name))

    @property
    def types(self) -> dict[str, TypeDefinition]:
        """Every registered type by name."""
        return dict(self._registry.types)

    def register_validator(
        self,
        state_type: TypeLike,
        validator: ValidatorLike,
        *,
        transitions: Sequence[TransitionLike] | None = None,
    ) -> None:
        """Check every state of *state_type* before it is written.

        :param validator: a callable taking the candidate record and returning
            ``False`` (or raising :class:`StateValidationError`) to reject it; a
            callable taking a second argument is a transition guard and receives
            the transition name; or a marshmallow ``Schema`` (class or instance)
            applied to ``data``.
        :param transitions: only run for these transitions.
        """
        type_name = normalize_type(state_type)
        self._registry.type(type_name)
        only = (
            None
            if transitions is None
            else frozenset(normalize_transition(t, known=None) for t in transitions)
        )
        with self._registry.lock:
            self._registry.validators.setdefault(type_name, []).append(Validator(validator, only))

    def register_migration(
        self,
        state_type: TypeLike,
        from_version: str,
        to_version: str,
        fn: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> None:
        """Upgrade the ``data`` of *state_type* records from one schema version to the next.

        Records carry their schema version in ``metadata["version"]``. Reads
        return them upgraded to the newest registered version, running every
        migration on the way (``"1.0"`` → ``"1.1"`` → ``"2.0"``); the next
        write stores them upgraded, and ``flask states migrate`` upgrades them
        all. Versions compare as versions: ``"1.10"`` is above ``"1.9"``.
        Registering again from the same *from_version* replaces that migration.

        :param fn: takes a private copy of ``data`` and returns the new
            ``data`` dict. It may run on every read until the record is
            written upgraded, so it should be pure and quick.
        :raises ConfigurationError: a version is not a version, *to_version* is
            not above *from_version*, or *fn* is not callable.
        """
        type_name = normalize_type(state_type)
        self._registry.type(type_name)
        self._registry.migrations.register(type_name, from_version, to_version, fn)

    def migrate_states(
        self, state_type: TypeLike | None = None, *, batch_size: int = 500
    ) -> MigrationRun:
        """Upgrade every stored state of a type (or of every type with migrations).

        Backs ``flask states migrate``: returns a :class:`~.migrations.MigrationRun`
        whose ``batches`` iterator does the work one batch at a time. Each
        upgrade is an ``update`` change with actor ``"migration"``; states
        already at the newest version are skipped, so an interrupted run
        continues when started again.

        :raises ConfigurationError: *state_type* has no migrations.
        """
        if type(batch_size) is not int or batch_size < 1:
            raise _Invalid("batch_size must be a positive integer.", {"batch_size": [">= 1."]})
        migrations = self._registry.migrations
        if state_type is None:
            types = migrations.types()
        else:
            type_name = normalize_type(state_type)
            self._registry.type(type_name)
            if migrations.latest(type_name) is None:
                raise ConfigurationError(
                    f"Type {type_name!r} has no data migrations; register one with "
                    f"register_migration({type_name!r}, from_version, to_version, fn)."
                )
            types = [type_name]
        return migrate_stored(self._registry, self._runtime(), types, batch_size)

    def register_callback(self, event: str, fn: Callback) -> None:
        """Call ``fn(state_id, old_state, new_state, transition_type)`` after matching commits.

        :param event: ``"<type>_<past tense>"`` such as ``"user_suspended"``, or a
            pattern: ``"user_*"``, ``"*_deleted"``, ``"*"``.
        """
        self._registry.callbacks.register(event, fn)

    # -- reads ----------------------------------------------------------------

    def get_state(self, state_id: str, *, include_expired: bool = False) -> State | None:
        """The live state, or ``None`` if absent, deleted or expired.

        A state whose TTL passed gets its EXPIRE change recorded here (actor
        ``"ttl"``) unless ``STATEMANAGER_EXPIRE_ON_READ`` is off.

        :param include_expired: also return a state whose TTL passed.
        """
        check_state_id(state_id)
        with self._operation("get_state", state_id) as runtime:
            row = runtime.store.get(state_id)
            if row is None or row["status"] == DELETED:
                return None
            now = utcnow()
            if is_live(row, now):
                return self._record(runtime, row)
            if needs_expiry(row, now) and runtime.settings.expire_on_read:
                recorded = expire(self._registry, runtime, state_id)  # already decrypted
                if recorded is not None:
                    if not include_expired:
                        return None  # no need to upgrade (and maybe fail) what is not returned
                    return self._registry.migrations.upgrade(recorded)[0]
                row = runtime.store.get(state_id)
                if row is None or row["status"] == DELETED:
                    return None
            return self._record(runtime, row) if include_expired else None

    def bulk_get(self, state_ids: Sequence[str]) -> dict[str, State]:
        """Live states by id, fetched in one round trip; absent ids are left out."""
        if isinstance(state_ids, str | bytes) or not isinstance(state_ids, Iterable):
            raise _Invalid(
                f"bulk_get takes a list of ids, got {type(state_ids).__name__}.",
                {"state_ids": ["A list of ids."]},
            )
        ids = list(dict.fromkeys(check_state_id(i) for i in state_ids))
        with self._operation("bulk_get") as runtime:
            now = utcnow()
            rows = runtime.store.get_many(ids)
            return {i: self._record(runtime, row) for i, row in rows.items() if is_live(row, now)}

    def search_states(
        self,
        state_type: TypeLike | None = None,
        filters: Mapping[str, Any] | None = None,
        *,
        page: int = 1,
        per_page: int = 50,
        order_by: str = "-updated_at",
    ) -> Page:
        """Live states matching *filters*, one page at a time, filtered in the database.

        :param filters: ``{"data.status": "active", "data.age__gte": 18}``: dotted
            paths into ``data``/``metadata`` or the columns ``name``, ``status``,
            ``type``, ``state_id``, ``version``, ``created_at``, ``updated_at``,
            ``expires_at``, with an optional operator suffix ``__ne __gt __gte
            __lt __lte __in __contains __exists``.
        :param order_by: a column, ``-`` for descending; ties go by ``state_id``.
        """
        type_name = None if state_type is None else normalize_type(state_type)
        if type_name is not None:
            self._registry.type(type_name)
        conditions = parse_conditions(filters)
        order = parse_order(order_by)
        with self._operation("search_states") as runtime:
            check_paging(page, per_page, runtime.settings.max_per_page)
            runtime.encryption.check_conditions(type_name, conditions)
            query = Query(type_name, conditions, order, (page - 1) * per_page, per_page, utcnow())
            items, total = runtime.store.query(query)
            return Page([self._record(runtime, r) for r in items], total, page, per_page)

    def get_states_by_type(
        self, state_type: TypeLike, *, page: int = 1, per_page: int = 50
    ) -> Page:
        """Live states of one type, most recently updated first."""
        return self.search_states(state_type, page=page, per_page=per_page)

    def get_state_history(self, state_id: str) -> list[Change]:
        """Every change of a state, oldest first (kept after deletion)."""
        check_state_id(state_id)
        with self._operation("get_state_history", state_id) as runtime:
            return self._changes(runtime, runtime.store.history(state_id))

    def verify_history(self, state_id: str | None = None) -> Iterator[BrokenLink | str]:
        """Check the tamper-evident hash chain of one state's history, or of all.

        Walks every state that has history (deleted ones included), a page at
        a time, and yields each state's id once it is checked, or a
        :class:`~flask_statemanager.audit.BrokenLink` naming the first entry
        whose hash does not follow from the entry before it (or a state record
        that does not match its newest entry). ``flask states verify`` prints
        them; see :mod:`flask_statemanager.audit`.

        :raises StateNotFoundError: *state_id* has neither a record nor history.
        """
        if state_id is not None:
            check_state_id(state_id)
        with self._operation("verify_history", state_id) as runtime:
            yield from self._verify(runtime, state_id)

    def _verify(self, runtime: Runtime, state_id: str | None) -> Iterator[BrokenLink | str]:
        store = runtime.store.primary  # the records themselves, not a cache
        opened = runtime.encryption  # hashes cover the plaintext
        after: str | None = None
        while True:
            batch = [state_id] if state_id is not None else store.state_ids(after, 500)
            for current in batch:
                history = [opened.open_change(c) for c in store.history(current)]
                stored = store.get(current)
                if state_id is not None and stored is None and not history:
                    raise StateNotFoundError(state_id)
                state = None if stored is None else opened.open_state(stored)
                broken = audit.verify(current, history, state)
                yield current if broken is None else broken
            if state_id is not None or not batch:
                return
            after = batch[-1]

    def get_recent_changes(self, state_id: str | None = None, limit: int = 10) -> list[Change]:
        """The newest changes, of one state or of all states, newest first."""
        if state_id is not None:
            check_state_id(state_id)
        if type(limit) is not int or not 1 <= limit <= 10_000:
            raise _Invalid("limit must be an integer from 1 to 10000.", {"limit": ["1 to 10000."]})
        with self._operation("get_recent_changes", state_id) as runtime:
            return self._changes(runtime, runtime.store.recent_changes(state_id, limit))

    def get_changes_by_transition(
        self, state_id: str, transition_type: TransitionLike
    ) -> list[Change]:
        """A state's changes of one transition, oldest first."""
        check_state_id(state_id)
        transition = normalize_transition(transition_type, known=None)
        with self._operation("get_changes_by_transition", state_id) as runtime:
            return self._changes(runtime, runtime.store.history(state_id, transition))

    def _record(self, runtime: Runtime, row: State) -> State:
        """A stored row as callers see it: decrypted, then upgraded to the newest schema."""
        return self._registry.migrations.upgrade(runtime.encryption.open_state(row))[0]

    def _changes(self, runtime: Runtime, changes: list[Change]) -> list[Change]:
        """Stored history entries as callers see them: decrypted."""
        return [runtime.encryption.open_change(c) for c in changes]

    # -- writes ---------------------------------------------------------------

    def _run(self, name: str, operation: Operation, *, attempts: int | None = None) -> State:
        with self._operation(name, operation.state_id, operation.transition) as runtime:
            return write(self._registry, runtime, operation, attempts=attempts)

    def register_state(
        self,
        state_id: str,
        state_type: TypeLike,
        initial_data: Mapping[str, Any],
        *,
        ttl: float | None = None,
        actor: str | None = None,
    ) -> State:
        """Create a state (status ``pending`` in the default lifecycle) at version 1.

        :param initial_data: ``{"name", "type", "data", "metadata"}``; ``type``, if
            given, must match *state_type*.
        :param ttl: seconds until it expires; defaults to the type's ``default_ttl``.
        :raises StateExistsError: a live state has this id.
        """
        operation = mutations.register(
            self._registry, state_id, state_type, initial_data, ttl=ttl, actor=actor
        )
        return self._run("register_state", operation)

    def update_state(
        self,
        state_id: str,
        new_data: Mapping[str, Any],
        transition: TransitionLike = StateTransition.UPDATE,
        *,
        expected_version: int | str | None = None,
        ttl: float | None = None,
        actor: str | None = None,
    ) -> State:
        """Replace a state's ``data`` (and ``name``/``metadata`` when given) with a transition.

        :param new_data: ``{"name", "type", "data", "metadata"}``.
        :param expected_version: the version (or etag) the state must be at.
        :raises StateConflictError: it is not at *expected_version*; nothing written.
        """
        operation = mutations.update(
            state_id,
            new_data,
            transition,
            expected_version=expected_version,
            ttl=ttl,
            actor=actor,
        )
        return self._run("update_state", operation)

    def patch_state(
        self,
        state_id: str,
        changes: Mapping[str, Any],
        *,
        expected_version: int | str | None = None,
        actor: str | None = None,
    ) -> State:
        """Apply a JSON merge patch (RFC 7386) to ``data``: ``None`` removes a key."""
        operation = mutations.patch(
            state_id, changes, expected_version=expected_version, actor=actor
        )
        return self._run("patch_state", operation)

    def transition(
        self,
        state_id: str,
        transition: TransitionLike,
        *,
        data: Mapping[str, Any] | None = None,
        expected_version: int | str | None = None,
        actor: str | None = None,
    ) -> State:
        """Apply a lifecycle transition, optionally replacing ``data``.

        :raises InvalidTransitionError: unknown, or not allowed from the current status.
        """
        operation = mutations.transition(
            state_id, transition, data=data, expected_version=expected_version, actor=actor
        )
        return self._run("transition", operation)

    def delete_state(
        self,
        state_id: str,
        *,
        expected_version: int | str | None = None,
        actor: str | None = None,
    ) -> None:
        """Delete a state: gone from reads, its history kept; the id can be registered again."""
        operation = mutations.delete(state_id, expected_version=expected_version, actor=actor)
        self._run("delete_state", operation)

    def atomic_update(
        self,
        state_id: str,
        fn: Callable[[dict[str, Any]], dict[str, Any]],
        *,
        retries: int = 5,
        actor: str | None = None,
    ) -> State:
        """Read, compute ``fn(data)``, compare-and-set: an update that loses no increment.

        The store reads the state under its lock (SQL row lock, SQLite write
        lock), so concurrent atomic updates queue; a store without locks
        retries from a fresh read on a lost compare-and-set. *fn* gets a
        private copy of ``data`` and returns the new ``data``; it may run more
        than once, so it should have no side effects.

        :raises StateConflictError: still losing after *retries* retries.
        """
        if type(retries) is not int or retries < 0:
            raise _Invalid("retries must be an integer >= 0.", {"retries": [">= 0."]})
        operation = mutations.compute(state_id, fn, actor=actor)
        return self._run("atomic_update", operation, attempts=retries + 1)

    def rollback(self, state_id: str, to_version: int, *, actor: str | None = None) -> State:
        """Restore the ``data`` a state had at *to_version*, as a new UPDATE change."""
        check_state_id(state_id)
        if type(to_version) is not int or to_version < 1:
            raise _Invalid(
                "to_version must be a positive integer.", {"to_version": ["A positive integer."]}
            )

        def build(current: State | None) -> Proposal:
            assert current is not None
            runtime = self._runtime()
            entries = self._changes(runtime, runtime.store.history(state_id))
            target = next((c for c in entries if c["version"] == to_version), None)
            if target is None or target["new_data"] is None:
                raise _Invalid(
                    f"State {state_id!r} has no data at version {to_version}; roll back to "
                    f"one of {[c['version'] for c in entries if c['new_data'] is not None]}.",
                    {"to_version": ["No such version."]},
                )
            return Proposal("update", data=target["new_data"], note={"rollback_to": to_version})

        return self._run("rollback", Operation(state_id, build, actor=actor))

    # -- many states --------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Change many states all together or not at all.

        ::

            with state_manager.transaction() as tx:
                tx.update_state("a", {"data": {...}})
                tx.transition("b", "activate")

        The changes are checked and committed when the block ends, in one store
        transaction; if one is refused (its error is raised) or the block
        raises, nothing is written. ``tx.results`` then holds the records.
        """
        tx = Transaction(self._registry)
        yield tx
        if tx.operations:
            with self._operation("transaction") as runtime:
                outcomes = commit(self._registry, runtime, tx.operations)
            tx.results = [o for o in outcomes if isinstance(o, State)]

    def bulk_register(self, items: Iterable[Mapping[str, Any]]) -> BulkResult:
        """Register many states in one store transaction; each item stands alone.

        :param items: keyword arguments of :meth:`register_state`, such as
            ``{"state_id": "u1", "state_type": "user", "initial_data": {...}}``.
        :returns: one outcome per item: the record, or the error that kept it
            out (the other items are written).
        """
        return self._bulk("bulk_register", items, partial(mutations.register, self._registry))

    def bulk_update(self, items: Iterable[Mapping[str, Any]]) -> BulkResult:
        """Update many states in one store transaction; each item stands alone.

        :param items: keyword arguments of :meth:`update_state`, such as
            ``{"state_id": "u1", "new_data": {...}, "expected_version": 3}``.
        :returns: one outcome per item: the record, or the error that kept it out.
        """
        return self._bulk("bulk_update", items, mutations.update)

    def _bulk(
        self, name: str, items: Iterable[Mapping[str, Any]], make: Callable[..., Operation]
    ) -> BulkResult:
        if isinstance(items, Mapping | str) or not isinstance(items, Iterable):
            raise _Invalid(
                f"{name} takes a list of items (dicts of keyword arguments).",
                {"items": ["A list of dicts."]},
            )
        ids: list[str | None] = []
        refused: dict[int, StateManagerError] = {}  # item position -> error
        operations: list[Operation] = []
        for position, item in enumerate(items):
            state_id = item.get("state_id") if isinstance(item, Mapping) else None
            ids.append(state_id if isinstance(state_id, str) else None)
            try:
                if not isinstance(item, Mapping):
                    raise _Invalid(
                        f"Each {name} item is a dict of keyword arguments.", {"items": ["A dict."]}
                    )
                operations.append(make(**item))
            except TypeError as exc:  # missing or unknown keyword arguments
                refused[position] = _Invalid(f"Bad {name} item: {exc}.", {"items": [str(exc)]})
            except StateManagerError as exc:
                refused[position] = exc
        committed: Iterator[Outcome] = iter(())
        if operations:
            with self._operation(name) as runtime:
                committed = iter(commit(self._registry, runtime, operations, partial=True))
        outcomes = [refused[p] if p in refused else next(committed) for p in range(len(ids))]
        return BulkResult(outcomes, ids)

    def sweep_expired(self, *, limit: int = 1000) -> int:
        """Record the EXPIRE change of up to *limit* states whose TTL passed.

        Safe to run from several workers at once: each expiry is recorded once.

        :returns: how many states this call expired.
        """
        if type(limit) is not int or limit < 1:
            raise _Invalid("limit must be a positive integer.", {"limit": ["A positive integer."]})
        with self._operation("sweep_expired") as runtime:
            return sweep(self._registry, runtime, limit)

    def check_encrypted(self, state: State, history: Sequence[Change] = ()) -> None:
        """Check that this app's keys open a stored state's encrypted values
        (and its history's), as ``flask states import`` does for every line.

        :raises ConfigurationError: no configured key opens a value, or the
            state's type has encrypted fields and no keys are configured.
        """
        encryption = self._runtime().encryption
        encryption.open_state(state)
        for change in history:
            encryption.open_change(change)

    def rotate_encryption_keys(
        self, *, batch_size: int = 500
    ) -> tuple[int, Iterator[int], dict[str, int]]:
        """Re-encrypt every stored encrypted value with the first key (``states rotate-keys``).

        Covers states (tombstones too) and history entries; values stored in
        plaintext before their field was declared encrypted are encrypted.
        Maintenance, not a change: no history entries, versions stay.

        :returns: the units to look at, the iterator doing one batch per step
            (yielding units done), and counters ``{"states", "changes"}`` of
            documents rewritten, filled in as the iterator runs.
        :raises ConfigurationError: no keys are configured.
        """
        if type(batch_size) is not int or batch_size < 1:
            raise _Invalid("batch_size must be a positive integer.", {"batch_size": [">= 1."]})
        runtime = self._runtime()
        encryption = runtime.encryption
        if encryption.cipher is None:
            raise ConfigurationError(
                "STATEMANAGER_ENCRYPTION_KEYS is not set: there is no key to re-encrypt with."
            )
        counts = {"states": 0, "changes": 0}

        def state(row: State) -> State | None:
            new = encryption.rotate_state(row)
            counts["states"] += new is not None
            return new

        def change(entry: Change) -> Change | None:
            new = encryption.rotate_change(entry)
            counts["changes"] += new is not None
            return new

        total, batches = runtime.store.rewrite(state, change, batch_size=batch_size)
        return total, batches, counts

    def prune(
        self,
        state_type: TypeLike | None = None,
        *,
        dry_run: bool = False,
        batch_size: int = 500,
        progress: Callable[[str, Pruned], None] | None = None,
    ) -> retention.PruneReport:
        """Apply every type's retention: trim old history, purge old deleted states.

        Each batch of *batch_size* states commits on its own; an interrupted
        run keeps what it did and the next one finishes. See :doc:`retention`.

        :param state_type: only this type (default: every registered type).
        :param dry_run: count what would be removed, remove nothing.
        :param progress: called after each batch with the type and a
            :class:`~.stores.base.Pruned`.
        :raises ConfigurationError: *state_type* has no retention to apply.
        """
        if type(batch_size) is not int or batch_size < 1:
            raise _Invalid(
                "batch_size must be a positive integer.", {"batch_size": ["A positive integer."]}
            )
        if state_type is not None:
            definitions = [self.get_type(state_type)]
        else:
            definitions = list(self._registry.types.values())
        with self._operation("prune") as runtime:
            if state_type is not None and not retention.has_retention(
                definitions[0], runtime.settings
            ):
                raise ConfigurationError(
                    f"Type {definitions[0].name!r} has no retention: register it with "
                    "keep_history, keep_history_for or purge_deleted_after, or set "
                    "STATEMANAGER_PURGE_DELETED_AFTER."
                )
            return retention.prune(
                runtime.store,
                definitions,
                runtime.settings,
                utcnow(),
                dry_run=dry_run,
                batch_size=batch_size,
                progress=progress,
            )

    # -- operations and health ---------------------------------------------------

    def get_health_status(self) -> dict[str, Any]:
        """``{"status", "store", "state_count", "state_count_exact", "cache_hit_rate", "checks"}``.

        ``status`` is ``"healthy"``, ``"degraded"`` when a secondary component
        (the Redis cache) is down while the store answers, or ``"unhealthy"``
        when the store itself does not answer. ``checks`` holds one report per
        component (``"database"``, and ``"redis"`` with a cache): its
        ``component``, ``status`` (``"up"``/``"down"``), ``latency_ms``, the
        ``time`` it was taken and, when down, an ``error`` with hosts, ports,
        URLs, credentials and the configured host, user and database names
        masked (:func:`~flask_statemanager.health.redact`).
        ``state_count`` is cheap enough to poll at millions of states: on
        PostgreSQL it is the planner's estimate once the table is large
        (``state_count_exact`` is then ``False``); ``None`` when down.
        """
        from .health import known_names, known_secrets, redact

        runtime = self._runtime()
        store = runtime.store
        check, count, exact = probe_store(store)
        checks = {"database": check, **store.components()}
        if check["status"] != "up":
            status = "unhealthy"
        elif any(c.get("status") != "up" for c in checks.values()):
            status = "degraded"
        else:
            status = "healthy"
        report = {
            "status": status,
            "store": store.kind,
            "state_count": count,
            "state_count_exact": exact,
            "cache_hit_rate": store.cache_hit_rate,
            "checks": checks,
        }
        secrets, names = known_secrets(runtime), known_names(runtime)
        return redact(report, secrets, names)  # type: ignore[no-any-return]

    def get_metrics(self) -> dict[str, Any]:
        """Counts per operation, transition and error, callback failures, latencies,
        and the cache's counters (``"cache"``, ``None`` without a cache)."""
        runtime = self._runtime()
        return {**runtime.metrics.snapshot(), "cache": runtime.store.cache_stats()}

    def log_state_operation(
        self,
        operation: str,
        state_id: str | None,
        transition_type: TransitionLike | None = None,
        duration_ms: float | None = None,
        **fields: Any,
    ) -> None:
        """Write a structured log line for an operation of your own."""
        transition = (
            None
            if transition_type is None
            else str(getattr(transition_type, "value", transition_type))
        )
        log_state_operation(operation, state_id, transition, duration_ms, **fields)


def probe_store(store: Store) -> tuple[dict[str, Any], int | None, bool | None]:
    """Ask the primary store whether it answers and how many states it holds.

    :returns: the check report ``{"component", "status": "up"|"down",
        "latency_ms", "time"}`` (plus ``"error"`` when down), and the state
        count and whether it is exact (``None`` when down). Never raises for an
        unreachable or unusable backend: missing tables make it ``"down"`` too.
    """
    start = time.perf_counter()
    check: dict[str, Any] = {"component": store.component, "time": isoformat(utcnow())}
    try:
        check.update(store.check())
        check["status"] = "up"
    except BackendUnavailableError as exc:
        check.update(status="down", error=str(exc))
    check["latency_ms"] = round((time.perf_counter() - start) * 1000, 3)
    if check["status"] != "up":
        return check, None, None
    try:
        count, exact = store.estimate_count()
    except BackendUnavailableError as exc:
        check.update(status="down", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - missing tables, permissions: not usable
        orig = getattr(exc, "orig", None) or exc
        reason = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
        check.update(status="down", error=f"Counting states failed: {reason}")
    else:
        return check, count, exact
    return check, None, None
