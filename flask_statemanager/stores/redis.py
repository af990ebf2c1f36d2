"""Redis store: states, versions and history in Redis alone.

**Keys**

Every key starts with ``STATEMANAGER_KEY_PREFIX`` (``<prefix>``, default
``statemanager``), then the kind of key, then what it is about — seed 003's
``<domain>:<type>:<id>``. The keys of one state carry the hash tag ``{<id>}``
(ids never contain braces), so they live in one Cluster slot:

``<prefix>:state:{<id>}``
    string: the state document, :meth:`State.to_json` with timestamps in one
    fixed-width UTC format (``2024-05-01T12:00:00.000000Z``) so that they
    compare correctly as strings. Tombstones (deleted or expired states) keep
    theirs for ``tombstone_ttl``, then Redis drops it (see TTL below).
``<prefix>:history:{<id>}``
    list: the change documents, oldest first; entry ``i`` is version
    ``pruned + i + 1``. A state's version is always its history's length plus
    its pruned count. Never expires (``flask states prune`` trims it).
``<prefix>:pruned:{<id>}``
    string: how many of the oldest history entries ``prune`` removed (absent
    for none); the scripts add it to the history's length to get the version.
``<prefix>:lock:{<id>}``
    string: the token of the writer holding the state (``SET NX PX``).

Shared keys index the live states (status neither deleted nor expired):

``<prefix>:type:<type>``
    sorted set: the type's live state ids, scored by ``updated_at`` in
    microseconds, so a type's states list newest first without sorting.
``<prefix>:tombstones:<type>``
    sorted set: the type's deleted and expired states, scored by their
    ``updated_at`` in microseconds (the time they became a tombstone), so
    ``prune`` finds them without a scan; it also holds tombstones whose
    document Redis dropped, until they are purged.
``<prefix>:expiry:<type>``
    sorted set: those with an ``expires_at``, scored by it in microseconds.
``<prefix>:index:<type>:<field>``
    sorted set, all scores 0: ``<encoded value>\\0<id>`` for a declared field
    (``register_type(..., indexes=["data.status"])``) holding a scalar;
    equality lookups are lexicographic range queries.
``<prefix>:types``
    set: the types that have had states.
``<prefix>:ids``
    sorted set, all scores 0: every state id that has history, deleted ones
    included, for maintenance walks (``flask states verify``).
``<prefix>:indexes``
    hash: type → its declared fields as JSON, ``{"data.status": true}``,
    ``false`` while the index of a newly declared field is being built (writes
    meanwhile add their members to it whether or not they changed, since the
    build skips states that moved on). A field no longer declared keeps its
    index, as SQL indexes stay; :meth:`RedisStore.setup` deletes the index and
    definition of a field a type now encrypts (its members are plain text).
``<prefix>:log``
    list: ``<id> <version> <change id>`` per committed change, in commit order, capped at
    the 10 000 newest (``get_recent_changes`` reads at most that many, walking
    back past pruned and purged changes and listing each change once).

**Writes**

Each store keeps, per process, the last document of up to
``record_cache_size`` states it read or committed (a bounded LRU of encoded
documents; reads never use it, they always ask Redis). When :meth:`RedisStore.apply`
knows every state asked for, the engine plans from those records and one script
(``redis_scripts/commit.lua``) commits: it checks that every stored document
is still, byte for byte, the remembered one (a version number can come back
after a restore or a purge elsewhere; a document does not) and that no other
writer holds its lock, then appends the
history entries, stores the documents and updates every index — all or
nothing, because a script runs alone and checks before it writes. A write then
costs one round trip. If a record was stale, a state locked, or the plan failed
or wrote nothing, the script writes nothing and answers "stale", and ``apply``
forgets those records and goes the locked way within the same call (the plan
runs again, from the fresh rows).

The locked way takes a short lock on each state (all at once, or none and
retry) in the script that reads them (``redis_scripts/lock_read.lua``), so
concurrent writers queue like on a database row lock instead of failing
compare-and-sets: with plain optimistic retries, four processes incrementing
one counter lose increments once the retries run out. Then the engine plans,
and the commit script runs as above and releases the locks: two round trips.
The compare-and-set stays the safety net when a lock expired under a slow
writer — it compares the versions and, byte for byte, the documents read
under the lock, since the version can come back on a new life of the state —
and makes a call resent after a lost reply recognise its own commit.

**Search**

``search_states`` runs in one Lua script (``redis_scripts/search.lua``) that
reads candidates from the type's sorted set (every type's without a type), or
from a declared field's index when a condition is an equality or ``__in`` on
it; it never uses ``KEYS`` or ``SCAN``. The script evaluates the conditions
with the reference semantics of :func:`flask_statemanager.query.matches`,
orders and pages on the server, and returns the page and the total. Listing a
type by ``updated_at`` with no conditions reads the sorted set in order and
only the page's documents. Otherwise the script decodes every candidate, and
Redis serves nothing else meanwhile (about 60 ms for 10 000 states): declare
indexes on the fields large types are searched by. Numbers compare as Lua
numbers (IEEE doubles): integers beyond 2**53 can compare equal to their
neighbours, except through a declared index, which encodes integers exactly.

**TTL**

A state with a TTL is listed in its type's expiry sorted set, which the
sweeper (:meth:`RedisStore.expired`) and searches read. Its document gets no
Redis expiry while it is live: Redis would delete it silently, with no way to
write the EXPIRE history entry in the same step, and reads must still see the
row so the engine records the expiry (lazily on read, or when swept). Once the
EXPIRE change is recorded — or the state deleted — its document is a tombstone,
and native key expiry (``PEXPIRE``) drops it after ``tombstone_ttl``: until
then ``get_state(include_expired=True)`` returns it; afterwards the id reads as
absent. The history never expires, and since it holds the version, a state
registered again over a dropped tombstone goes on from the next version.

**Redis Cluster**

A state's own keys share a slot through their hash tag, but the shared index
keys live in other slots, and a write updates both in one script, which Redis
Cluster refuses (``CROSSSLOT``); so do the reading scripts (search, sweep,
count, recent changes), which read the state keys their indexes name. This
store therefore needs one Redis server (with replicas and Sentinel as you
like). On Cluster it would need every key under one hash tag (one slot:
correct, but one shard holds everything), or indexes kept per slot and
searches fanned out to every shard — neither is implemented.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from importlib import resources
from typing import Any, NamedTuple, cast

import redis

from .. import codec
from ..definitions import TypeDefinition
from ..errors import (
    BackendUnavailableError,
    ConfigurationError,
    StateLimitError,
    StateValidationError,
)
from ..query import Query
from ..records import Change, State
from .base import (
    ChangeRewrite,
    LostRace,
    Plan,
    Pruned,
    Retention,
    StateRewrite,
    Store,
    Tally,
    VersionMismatch,
    Write,
    check_restore,
    restore_refused,
)
from .redis_calls import Scripts
from .redis_records import (
    TOMBSTONES,
    UNKNOWN_HEAD,
    Members,
    RecordCache,
    Remembered,
    ScriptKeys,
    declared_fields,
    decode_change,
    decode_state,
    definition_json,
    dropped_tombstone,
    encode_document,
    encode_scalar,
    epoch_micros,
    index_member,
    jsonable,
    to_text,
    utc_stamp,
)

_SCRIPTS = (
    "backfill",
    "commit",
    "count",
    "define",
    "expired",
    "lock_read",
    "prune",
    "recent",
    "restore",
    "rewrite",
    "search",
    "unlock",
)
#: Changes kept in the change log: ``get_recent_changes`` reads at most this many.
_LOG_LENGTH = 10_000
#: Columns a ``__contains`` can never match (only strings and arrays contain).
_NOT_TEXT = frozenset({"version", "created_at", "updated_at", "expires_at"})
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://\S*")
_GLOB = re.compile(r"([*?\[\]\\])")


class RedisStore(Store):
    """States and history in Redis; see the module documentation for the keys.

    :param client: a redis-py client.
    :param owns_client: the store made *client* (from a URL) and closes it in
        :meth:`close`; an application's client is left open.
    :param prefix: the first part of every key (``STATEMANAGER_KEY_PREFIX``).
    :param lock_ttl: seconds a writer's lock lives if the writer dies holding it.
    :param lock_wait: seconds a writer waits for a locked state before giving up
        with :class:`~flask_statemanager.errors.BackendUnavailableError`.
    :param tombstone_ttl: seconds Redis keeps the document of a deleted or
        expired state before dropping it; ``None`` keeps it forever.
    :param record_cache_size: how many states' last known documents
        :meth:`apply` keeps to plan a write in one round trip (``0``: none).
    """

    kind = "redis"

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str,
        lock_ttl: float = 2.0,
        lock_wait: float = 5.0,
        tombstone_ttl: float | None = 7 * 24 * 3600.0,
        owns_client: bool = False,
        record_cache_size: int = 10_000,
    ) -> None:
        if not prefix or any(c in prefix for c in "{} \n\r\t"):
            raise ConfigurationError(
                "The Redis key prefix must be a non-empty string without spaces or braces."
            )
        self.client = client
        self._owns_client = owns_client
        self.prefix = prefix
        self._lock_ms = max(1, round(lock_ttl * 1000))
        self._lock_wait = lock_wait
        self._tombstone_ms = 0 if tombstone_ttl is None else max(1, round(tombstone_ttl * 1000))
        folder = resources.files(__package__).joinpath("redis_scripts")
        self._scripts = Scripts(
            client, {name: folder.joinpath(f"{name}.lua").read_text("utf-8") for name in _SCRIPTS}
        )
        password = client.connection_pool.connection_kwargs.get("password")
        self._password = str(password) if password else None
        #: Each type's index definition as stored (raw JSON), loaded on first write.
        self._definitions: dict[str, str] | None = None
        self._types_key = f"{prefix}:types"
        #: Every state id that has history (score 0, ordered by id), for maintenance walks.
        self._ids_key = f"{prefix}:ids"
        self._log_key = f"{prefix}:log"
        self._definitions_key = f"{prefix}:indexes"
        #: The last document of each state this process read or committed.
        self._records = RecordCache(record_cache_size)
        self._layouts: dict[tuple[str, str | None], _Layout] = {}
        #: Per type, the fields it stores encrypted (as of :meth:`setup`): never indexed.
        self._encrypted: dict[str, frozenset[str]] = {}

    # -- keys -------------------------------------------------------------------

    def state_key(self, state_id: str) -> str:
        """The key of a state's document."""
        return f"{self.prefix}:state:{{{state_id}}}"

    def history_key(self, state_id: str) -> str:
        """The key of a state's history list."""
        return f"{self.prefix}:history:{{{state_id}}}"

    def pruned_key(self, state_id: str) -> str:
        """The key counting the history entries pruned from a state."""
        return f"{self.prefix}:pruned:{{{state_id}}}"

    def tombstones_key(self, type_name: str) -> str:
        """The sorted set of a type's deleted and expired states."""
        return f"{self.prefix}:tombstones:{type_name}"

    def lock_key(self, state_id: str) -> str:
        """The key of a state's write lock."""
        return f"{self.prefix}:lock:{{{state_id}}}"

    def type_key(self, type_name: str) -> str:
        """The sorted set of a type's live states."""
        return f"{self.prefix}:type:{type_name}"

    def expiry_key(self, type_name: str) -> str:
        """The sorted set of a type's live states that have an ``expires_at``."""
        return f"{self.prefix}:expiry:{type_name}"

    def index_key(self, type_name: str, field: str) -> str:
        """The sorted set indexing a declared field of a type."""
        return f"{self.prefix}:index:{type_name}:{field}"

    # -- plumbing ---------------------------------------------------------------

    @contextmanager
    def _redis(self) -> Iterator[None]:
        """Turn any Redis error into :class:`BackendUnavailableError`."""
        try:
            yield
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: Exception) -> BackendUnavailableError:
        # The first line of the driver's message, with no URL or password in it.
        text = str(exc).strip()
        reason = _URL.sub("<url>", text.splitlines()[0] if text else type(exc).__name__)
        if self._password:
            reason = reason.replace(self._password, "***")
        return BackendUnavailableError(f"Redis is unavailable: {reason}", backend="redis")

    def _run(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one of the Lua scripts (EVALSHA, loading it if the server lost it)."""
        try:  # not self._redis(): this is every write's path, and a plain try is cheaper
            return self._scripts.run(script, keys, args)
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    def _load_definitions(self) -> dict[str, str]:
        definitions = self._definitions
        if definitions is None:
            with self._redis():
                stored = self.client.hgetall(self._definitions_key)
            definitions = {to_text(k): to_text(v) for k, v in stored.items()}
            self._definitions = definitions
        return definitions

    # -- schema -----------------------------------------------------------------

    def setup(self, types: Iterable[TypeDefinition]) -> None:
        """Load the scripts and build the index of every declared field.

        A field declared for the first time is indexed from then on by every
        write (in every process: writes check the definitions they planned
        with), and the states already stored are added to its index before
        searches use it. A field no longer declared keeps its index, as SQL
        indexes stay — except a field the type now stores encrypted: its index
        (which holds the values in plain text) and its definition are deleted,
        and no write indexes it again.
        """
        with self._redis():
            for source in self._scripts.sources.values():
                self.client.script_load(source)
        types = list(types)
        self._encrypted = {t.name: frozenset(t.encrypted_fields) for t in types}
        self._layouts.clear()
        for definition in types:
            if definition.encrypted_fields:
                self._drop_encrypted(definition.name, frozenset(definition.encrypted_fields))
            if definition.indexes:
                self._declare(definition.name, definition.indexes)
        self._definitions = None

    def _drop_encrypted(self, type_name: str, encrypted: frozenset[str]) -> None:
        """Delete the indexes (and their definitions) of fields *type_name* encrypts."""
        for _ in range(100):
            with self._redis():
                raw = self.client.hget(self._definitions_key, type_name)
            stored = to_text(raw) if raw is not None else ""
            current: dict[str, bool] = codec.loads(stored) if stored else {}
            doomed = sorted(f for f in current if f in encrypted)
            if not doomed:
                return
            kept = {f: built for f, built in current.items() if f not in encrypted}
            # The definition first: a writer still planning with the field is
            # sent back to plan again (see commit.lua) before the index goes.
            pending = definition_json(kept) if kept else ""
            if self._run("define", [self._definitions_key], [type_name, stored, pending]):
                with self._redis():
                    self.client.delete(*(self.index_key(type_name, f) for f in doomed))
                return
        raise BackendUnavailableError(
            f"The indexes of type {type_name!r} kept changing while being dropped; run "
            "create_all (flask states init-db) again.",
            backend="redis",
        )

    def _declare(self, type_name: str, fields: Sequence[str]) -> None:
        for _ in range(100):
            with self._redis():
                raw = self.client.hget(self._definitions_key, type_name)
            stored = to_text(raw) if raw is not None else ""
            current: dict[str, bool] = codec.loads(stored) if stored else {}
            wanted = {**current, **{f: current.get(f, False) for f in fields}}
            building = sorted(f for f, built in wanted.items() if not built)
            if not building:
                return
            pending = definition_json(wanted)
            if pending != stored and not self._run(
                "define", [self._definitions_key], [type_name, stored, pending]
            ):
                continue  # another process changed the definition: read it again
            self._backfill(type_name, building)
            done = definition_json(dict.fromkeys(wanted, True))
            if self._run("define", [self._definitions_key], [type_name, pending, done]):
                return
        raise BackendUnavailableError(
            f"The indexes of type {type_name!r} kept changing while being built; run "
            "create_all (flask states init-db) again.",
            backend="redis",
        )

    def _backfill(self, type_name: str, fields: Sequence[str]) -> None:
        """Index the stored states of a type under newly declared *fields*."""
        cursor = 0
        while True:
            with self._redis():
                cursor, found = self.client.zscan(self.type_key(type_name), cursor, count=500)
                ids = [to_text(cast("bytes | str", member)) for member, _score in found]
                raws = self.client.mget([self.state_key(i) for i in ids]) if ids else []
            keys = ScriptKeys()
            args: list[Any] = []
            for state_id, raw in zip(ids, raws, strict=True):
                state = None if raw is None else decode_state(raw)
                if state is None or state["status"] in TOMBSTONES or state["type"] != type_name:
                    continue
                for field in fields:
                    member = index_member(state, field)
                    if member is not None:
                        args += [
                            keys.add(self.history_key(state_id)),
                            keys.add(self.pruned_key(state_id)),
                            state["version"],
                            keys.add(self.index_key(type_name, field)),
                            member,
                        ]
            if args:
                self._run("backfill", keys.names, args)
            if cursor == 0:
                return

    # -- reads ------------------------------------------------------------------

    def get(self, state_id: str) -> State | None:
        with self._redis():
            raw = self.client.get(self.state_key(state_id))
        if raw is None:
            self._records.forget((state_id,))
            return None
        state = decode_state(raw)
        self._records.put(state_id, state["version"], raw, UNKNOWN_HEAD)
        return state

    def get_many(self, state_ids: Sequence[str]) -> dict[str, State]:
        if not state_ids:
            return {}
        with self._redis():
            raws = self.client.mget([self.state_key(i) for i in state_ids])
        found: dict[str, State] = {}
        put = self._records.put
        for state_id, raw in zip(state_ids, raws, strict=True):
            if raw is not None:
                state = found[state_id] = decode_state(raw)
                put(state_id, state["version"], raw, UNKNOWN_HEAD)
        return found

    def query(self, query: Query) -> tuple[list[State], int]:
        if any(c.op == "contains" and c.root in _NOT_TEXT for c in query.conditions):
            return [], 0  # a number or a timestamp never contains anything
        keys = [self._definitions_key, self._types_key]
        hints: list[list[Any]] = []
        if query.type is not None:
            keys += [self.type_key(query.type), self.expiry_key(query.type)]
            for c in query.conditions:
                if c.is_json and c.op in ("eq", "in"):
                    field = ".".join((c.root, *c.path))
                    values = c.value if c.op == "in" else (c.value,)
                    encoded = dict.fromkeys(encode_scalar(v) for v in values)
                    keys.append(self.index_key(query.type, field))
                    hints.append([field, len(keys), [e.decode() for e in encoded if e]])
        conditions = [
            {
                "r": c.root,
                "p": list(c.path),
                "o": c.op,
                "v": jsonable(c.value),
            }
            for c in query.conditions
        ]
        reply = self._run(
            "search",
            keys,
            [
                self.prefix,
                query.type or "",
                utc_stamp(query.now),
                epoch_micros(query.now),
                query.order.root,
                "1" if query.order.descending else "0",
                query.offset,
                query.limit,
                codec.dumps(conditions),
                codec.dumps(hints),
            ],
        )
        return [decode_state(raw) for raw in reply[1:] if raw is not None], int(reply[0])

    def scan(self, state_type: str | None = None, batch_size: int = 500) -> Iterator[list[State]]:
        """Every stored document in id order, walking ``<prefix>:ids`` (no ``SCAN``).
        Tombstones Redis already dropped are not seen; their history stays."""
        after: str | None = None
        while True:
            ids = self.state_ids(after, batch_size)
            if not ids:
                return
            with self._redis():
                raws = self.client.mget([self.state_key(i) for i in ids])
            batch = [
                state
                for state in (decode_state(raw) for raw in raws if raw is not None)
                if state_type is None or state["type"] == state_type
            ]
            if batch:
                yield batch
            after = ids[-1]

    def tally(self) -> Tally:
        """Walks the documents (:meth:`scan`) and their histories' lengths, a batch per
        round trip; histories of tombstones Redis dropped are not counted."""
        tally = Tally()
        for batch in self.scan():
            with self._redis():
                pipe = self.client.pipeline(transaction=False)
                for state in batch:
                    tally.add(state["type"], state["status"])
                    pipe.llen(self.history_key(state["state_id"]))
                tally.history += sum(pipe.execute())
        return tally

    def history(self, state_id: str, transition: str | None = None) -> list[Change]:
        with self._redis():
            raws = self.client.lrange(self.history_key(state_id), 0, -1)
        changes = [decode_change(raw) for raw in raws]
        if transition is None:
            return changes
        return [c for c in changes if c["transition"] == transition]

    def recent_changes(self, state_id: str | None, limit: int) -> list[Change]:
        if state_id is None:
            raws = self._run("recent", [self._log_key], [self.prefix, limit])
        else:
            with self._redis():
                raws = self.client.lrange(self.history_key(state_id), -limit, -1)[::-1]
        return [decode_change(raw) for raw in raws if raw is not None]

    def expired(self, now: datetime, limit: int) -> list[State]:
        raws = self._run("expired", [self._types_key], [self.prefix, epoch_micros(now), limit])
        due = (decode_state(raw) for raw in raws if raw is not None)
        return [s for s in due if s["status"] not in TOMBSTONES and s.is_expired(now)]

    def state_ids(self, after: str | None, limit: int) -> list[str]:
        start = "-" if after is None else f"({after}"
        with self._redis():
            ids = self.client.zrangebylex(self._ids_key, start, "+", start=0, num=limit)
        return [to_text(i) for i in ids]

    def stored_ids(self, state_ids: Sequence[str]) -> set[str]:
        """Ids in ``<prefix>:ids``: also those whose tombstone Redis dropped."""
        if not state_ids:
            return set()
        with self._redis():
            scores = self.client.zmscore(self._ids_key, list(state_ids))
        return {i for i, score in zip(state_ids, scores, strict=True) if score is not None}

    def count(self) -> int:
        return int(self._run("count", [self._types_key], [self.prefix]))

    def count_type(self, type_name: str, limit: int | None = None) -> int:
        with self._redis():
            found = int(self.client.zcard(self.type_key(type_name)))
        return found if limit is None else min(found, limit)

    def type_size(self, type_name: str) -> int:
        with self._redis(), self.client.pipeline(transaction=False) as pipe:
            pipe.zcard(self.type_key(type_name))
            pipe.zcard(self.tombstones_key(type_name))
            return sum(int(n) for n in pipe.execute())

    def prune(
        self,
        type_name: str,
        retention: Retention,
        *,
        batch_size: int = 500,
        dry_run: bool = False,
    ) -> Iterator[Pruned]:
        """Walk the type's live and tombstone sets with ``ZSCAN``; one script per batch.

        Tombstones stored before this store kept its tombstone sets are not
        in them, so they are not purged.
        """
        rule = codec.dumps(
            [
                type_name,
                retention.keep_last or False,
                False if retention.keep_since is None else utc_stamp(retention.keep_since),
                False if retention.purge_before is None else utc_stamp(retention.purge_before),
                dry_run,
            ]
        )
        for source in (self.type_key(type_name), self.tombstones_key(type_name)):
            cursor = 0
            while True:
                with self._redis():
                    cursor, found = self.client.zscan(source, cursor, count=batch_size)
                ids = [to_text(cast("bytes | str", member)) for member, _score in found]
                # A small set comes back whole, whatever COUNT says.
                for start in range(0, len(ids), batch_size):
                    yield self._prune_batch(type_name, ids[start : start + batch_size], rule)
                if cursor == 0:
                    break

    def _prune_batch(self, type_name: str, ids: Sequence[str], rule: bytes) -> Pruned:
        keys = [self.tombstones_key(type_name)]
        for state_id in ids:
            keys += [
                self.state_key(state_id),
                self.history_key(state_id),
                self.pruned_key(state_id),
                self.lock_key(state_id),
            ]
        keys.append(self._ids_key)
        reply = self._run("prune", keys, [rule, *ids])
        purged = tuple(to_text(i) for i in reply[1:])
        self._records.forget(purged)
        return Pruned(len(ids), int(reply[0]), purged)

    def check(self) -> dict[str, Any]:
        with self._redis():
            self.client.ping()
        return {"component": "redis"}

    # -- writes -----------------------------------------------------------------

    def apply(self, state_ids: Sequence[str], plan: Plan) -> Sequence[Write]:
        ids = list(state_ids) if len(state_ids) == 1 else sorted(set(state_ids))
        known = self._records.recall(ids)
        if known is not None:
            writes = self._apply_optimistic(ids, state_ids, known, plan)
            if writes is not None:
                return writes
            self._records.forget(ids)
        token = uuid.uuid4().hex
        rows, heads, read = self._lock_and_read(ids, token)
        released = False
        try:
            writes = plan({i: rows[i] for i in state_ids}, {i: heads[i] for i in state_ids})
            if writes:
                self._commit(ids, rows, writes, token, read=read)
                released = True  # the commit script released the locks
            return writes
        finally:
            if not released:
                self._unlock(ids, token)

    def _apply_optimistic(
        self,
        ids: Sequence[str],
        state_ids: Sequence[str],
        known: Mapping[str, Remembered],
        plan: Plan,
    ) -> Sequence[Write] | None:
        """Plan from the record cache and commit in one round trip, or ``None``.

        ``None`` means nothing was written and the caller must read again under
        locks: a record was stale, a state locked, or the plan failed or wrote
        nothing (which a stale record could explain, so only a fresh read may
        say so).
        """
        rows: dict[str, State | None] = {i: decode_state(r.document) for i, r in known.items()}
        try:
            writes = plan(
                rows if len(rows) == len(state_ids) else {i: rows[i] for i in state_ids},
                {i: known[i].head for i in state_ids},
            )
        except Exception:  # noqa: BLE001 - planned from a record that may be stale
            return None
        if not writes:
            return None
        try:
            self._commit(ids, rows, writes, "", remembered=known)
        except _Stale:
            return None
        return writes

    def restore(self, state: State, changes: Sequence[Change], *, replace: bool = False) -> None:
        """Restore in one script (``redis_scripts/restore.lua``), keeping the invariants.

        The history must be versions 1 to n with the state at version n, since
        this store's version *is* its history's length.
        """
        check_restore(state, changes)
        state_id = state["state_id"]
        if [c["version"] for c in changes] != list(range(1, state["version"] + 1)):
            raise StateValidationError(
                f"State {state_id!r} is at version {state['version']} with "
                f"{len(changes)} history entries; the Redis store needs the whole history "
                "(versions 1 to the state's version), so it cannot restore a pruned one.",
                {"history": ["Versions 1 to the state's version, each once."]},
            )
        documents = [encode_document(state), *(encode_document(c) for c in changes)]
        tombstone_ms = self._tombstone_ms if state["status"] in TOMBSTONES else 0
        entries = [f"{state_id} {c['version']} {c['change_id']}" for c in changes]
        deadline = time.monotonic() + self._lock_wait
        while True:
            with self._redis():
                pipe = self.client.pipeline(transaction=False)
                pipe.get(self.state_key(state_id))
                pipe.llen(self.history_key(state_id))
                raw, length = pipe.execute()
            if not replace and (raw is not None or length > 0):
                raise restore_refused(state_id)
            keys = ScriptKeys()
            for name in (
                self.state_key(state_id),
                self.history_key(state_id),
                self.lock_key(state_id),
                self._definitions_key,
                self._log_key,
                self.pruned_key(state_id),
            ):
                keys.add(name)
            current = None if raw is None else decode_state(raw)
            checks, operations, _ = self._index_operations(
                {state_id: current}, {state_id: state}, keys
            )
            operations += ["zadd", keys.add(self._ids_key), 0, state_id]
            control = codec.dumps(
                [length, replace, tombstone_ms, _LOG_LENGTH, checks, operations, entries]
            )
            try:
                reply = self._run("restore", keys.names, [control, raw or b"", *documents])
            finally:
                self._records.forget((state_id,))
            if reply == 1:
                return
            if reply == 0:
                raise restore_refused(state_id)
            if reply == -1:
                self._definitions = None  # a field was declared meanwhile: plan again
            if time.monotonic() >= deadline:
                raise BackendUnavailableError(
                    f"State {state_id!r} kept changing or stayed locked by writers for "
                    f"{self._lock_wait:g} s during its restore; retry later.",
                    backend="redis",
                )
            if reply == -3:
                time.sleep(0.002 * (0.5 + random.random()))

    def _lock_and_read(
        self, ids: Sequence[str], token: str
    ) -> tuple[dict[str, State | None], dict[str, str | None], dict[str, bytes | None]]:
        """Lock every state in *ids* (waiting for other writers) and read them.

        Returns the rows, the hash of each state's newest history entry, and
        each stored document as read (``None`` for none), which the commit
        compares byte for byte.
        """
        keys = (
            [self.lock_key(i) for i in ids]
            + [self.state_key(i) for i in ids]
            + [self.history_key(i) for i in ids]
            + [self.pruned_key(i) for i in ids]
        )
        deadline = time.monotonic() + self._lock_wait
        pause = 0.0005
        while True:
            reply = self._run("lock_read", keys, [token, self._lock_ms])
            if int(reply[0]) == 1:
                break
            if time.monotonic() >= deadline:
                raise BackendUnavailableError(
                    f"State {ids[int(reply[1]) - 1]!r} stayed locked by other writers for "
                    f"{self._lock_wait:g} s; retry later.",
                    backend="redis",
                )
            # Holders keep a lock for two round trips: poll soon, with jitter.
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, 0.004)
        rows: dict[str, State | None] = {}
        heads: dict[str, str | None] = {}
        read: dict[str, bytes | None] = {}
        for n, state_id in enumerate(ids):
            raw, version, last = reply[1 + 3 * n : 4 + 3 * n]
            read[state_id] = raw
            change = decode_change(last) if last is not None else None
            heads[state_id] = change.get("hash") if change is not None else None
            if raw is not None:
                rows[state_id] = decode_state(raw)
                self._records.put(state_id, int(version), raw, heads[state_id])
            elif int(version) > 0:
                rows[state_id] = dropped_tombstone(state_id, int(version), change)
            else:
                rows[state_id] = None
        return rows, heads, read

    def _unlock(self, ids: Sequence[str], token: str) -> None:
        try:
            self._run("unlock", [self.lock_key(i) for i in ids], [token])
        except BackendUnavailableError:
            pass  # the locks expire on their own; keep the error that brought us here

    def _commit(
        self,
        ids: Sequence[str],
        rows: Mapping[str, State | None],
        writes: Sequence[Write],
        token: str,
        *,
        read: Mapping[str, bytes | str | None] | None = None,
        remembered: Mapping[str, Remembered] | None = None,
    ) -> None:
        """Run the commit script; raise :class:`VersionMismatch` if a state moved on,
        :class:`LostRace` if the batch would take a type past its ``max_states``.

        *read*: the locks are held and these are the documents *rows* were
        decoded from; raise :class:`VersionMismatch` (nothing written) unless
        every stored document is still, byte for byte, the one read — a writer
        that outlived its lock may find the same version on a new life of the
        state. *remembered*: optimistic, no locks are held and *rows* were
        decoded from these records of the record cache; raise :class:`_Stale`
        instead (nothing written) unless every stored document is still the
        remembered one and no other writer holds a state.
        """
        optimistic = remembered is not None
        numbers = {state_id: n for n, state_id in enumerate(ids, 1)}
        final: dict[str, State] = {}
        documents: dict[str, bytes] = {}
        entries: list[Any] = []
        args: list[Any] = [b""]
        for write in writes:
            state = write.state
            state_id = state["state_id"]
            if state_id not in numbers:
                raise ValueError(f"The plan wrote {state_id!r}, which apply() did not read.")
            final[state_id] = state
            document = documents[state_id] = encode_document(state)
            args += [document, encode_document(write.change)]
            logged = f"{state_id} {state['version']} {write.change['change_id']}"
            entries += [numbers[state_id], write.expected_version, logged]
        tombstones = [
            state_id in final and final[state_id]["status"] in TOMBSTONES for state_id in ids
        ]
        if remembered is not None:
            args += [remembered[state_id].document for state_id in ids]
        elif read is not None:
            args += [read[state_id] or b"" for state_id in ids]
        else:
            raise ValueError("A commit needs the documents its plan was read from.")
        fixed: list[str] = []
        for state_id in ids:
            fixed += (
                self.state_key(state_id),
                self.history_key(state_id),
                self.lock_key(state_id),
                self.pruned_key(state_id),
            )
        fixed += (self._definitions_key, self._log_key)
        for _ in range(10):
            keys = ScriptKeys(fixed)
            checks, operations, members = self._index_operations(rows, final, keys, remembered)
            for write in writes:
                if write.expected_version == 0:  # a state's first entry
                    operations += ["zadd", keys.add(self._ids_key), 0, write.state["state_id"]]
            # Everything but the documents in one JSON argument: redis-py encodes
            # each argument on its own, and that dominated the client's cost.
            args[0] = codec.dumps(
                [
                    token,
                    self._tombstone_ms,
                    len(ids),
                    _LOG_LENGTH,
                    optimistic,
                    checks,
                    entries,
                    tombstones,
                    operations,
                    self._limits(writes, keys),
                ]
            )
            try:
                reply = self._run("commit", keys.names, args)
            except BackendUnavailableError:
                self._records.forget(ids)  # the write may or may not have landed
                raise
            if isinstance(reply, list) and int(reply[0]) == 0:  # over a max_states
                # The engine counted the type under no lock that covers other
                # writers: one created a state since. Plan again from a fresh
                # count, so a bulk registration keeps the items that still fit.
                raise LostRace(self._over_limit(writes, int(reply[1]), int(reply[2])))
            if isinstance(reply, list):  # a state is not at its expected version
                self._records.forget(ids)
                raise VersionMismatch(ids[int(reply[0]) - 1], int(reply[1]) or None)
            if reply > 0:  # committed, now or by an earlier try of this call
                heads = {w.state["state_id"]: w.change["hash"] for w in writes}
                for state_id, document in documents.items():
                    self._records.put(
                        state_id,
                        final[state_id]["version"],
                        document,
                        heads[state_id],
                        members[state_id],
                    )
                return
            if reply == 0:
                raise _Stale
            self._definitions = None  # a field was declared meanwhile: plan again
        raise BackendUnavailableError(
            "The index definitions kept changing during a write; retry it.", backend="redis"
        )

    def _limitations(self, writes: Sequence[Write]) -> dict[str, tuple[int, list[str], list[str]]]:
        """Per type the writes create a state of that has a ``max_states``: the
        limit, the ids the batch leaves live in the type, and the other ids it
        writes (which leave the type if they were in it)."""
        limited: dict[str, tuple[int, list[str], list[str]]] = {}
        for write in writes:
            if write.limit is not None and write.state["status"] not in TOMBSTONES:
                limited.setdefault(write.state["type"], (write.limit, [], []))
        if limited:
            final = {w.state["state_id"]: w.state for w in writes}
            for state_id, state in final.items():
                for type_name, (_, inside, outside) in limited.items():
                    live = state["type"] == type_name and state["status"] not in TOMBSTONES
                    (inside if live else outside).append(state_id)
        return limited

    def _limits(self, writes: Sequence[Write], keys: ScriptKeys) -> list[Any]:
        """The commit script's limit checks: type set key number, maximum, ids."""
        checks: list[Any] = []
        for type_name, (limit, inside, outside) in self._limitations(writes).items():
            checks += [keys.add(self.type_key(type_name)), limit, inside, outside]
        return checks

    def _over_limit(self, writes: Sequence[Write], number: int, count: int) -> StateLimitError:
        type_name, (limit, _, _) = list(self._limitations(writes).items())[number - 1]
        return StateLimitError(
            f"Type {type_name!r} may hold at most {limit} states (max_states) and this batch "
            f"would make it {count}: other writers kept creating states of the type while "
            "it was planned. Delete states of this type or raise the limit.",
            limit="states",
            value=count,
            maximum=limit,
        )

    def _index_operations(
        self,
        rows: Mapping[str, State | None],
        final: Mapping[str, State],
        keys: ScriptKeys,
        remembered: Mapping[str, Remembered] | None = None,
    ) -> tuple[list[Any], list[Any], dict[str, Members]]:
        """The definition checks and index operations that take *rows* to *final*.

        Returns ``(checks, operations)`` as the commit script reads them, and
        the index members of each final state; adds the index keys the
        operations name to *keys*. Only what changes is sent: a state that
        stays live in its type keeps its index members unless their values
        changed, and its type is already in the type set. The members of
        *remembered* rows are reused when computed under the same definitions.
        """
        definitions = self._load_definitions()
        removals: list[Any] = []
        additions: list[Any] = []
        checked: set[str] = set()
        members: dict[str, Members] = {}
        for state_id, new in final.items():
            old = rows.get(state_id)
            known = remembered[state_id].members if remembered is not None else None
            if known is not None and known.definitions is definitions:
                before = known.entries
            else:
                before = self._entries(old, definitions)
            after = self._entries(new, definitions)
            members[state_id] = Members(definitions, after)
            # An index still being built may lack the member *before* names (the
            # backfill skips states that move on meanwhile): add it again anyway.
            declared = definitions.get(new["type"])
            building = self._layout(new["type"], declared).building if declared else ()
            if before:
                checked.add(old["type"])  # type: ignore[index]
            if after:
                checked.add(new["type"])
            for entry in before:
                if entry not in after:
                    removals += ["zrem", keys.add(entry[0]), 0, entry[1]]
            for entry, score in after.items():
                if before.get(entry) != score or entry[0] in building:
                    additions += ["zadd", keys.add(entry[0]), score, entry[1]]
            if after and (not before or old["type"] != new["type"]):  # type: ignore[index]
                additions += ["sadd", keys.add(self._types_key), 0, new["type"]]
        checks: list[Any] = []
        for type_name in sorted(checked):
            checks += [type_name, definitions.get(type_name, "")]
        # Removals come first, so a member that stays is re-added.
        return checks, removals + additions, members

    def _entries(
        self, state: State | None, definitions: Mapping[str, str]
    ) -> dict[tuple[str, str], int]:
        """The index members of *state*: ``{(key, member): score}`` (none for tombstones).

        Members are ``str``: the commit script takes them in a JSON argument (an
        index member is always valid UTF-8, ``\\0`` travels as ``\\u0000``).
        """
        if state is None:
            return {}
        type_name = state["type"]
        state_id = state["state_id"]
        if state["status"] in TOMBSTONES:
            # A dropped tombstone's stand-in has no type: it was in a set once.
            if not type_name:
                return {}
            return {(self.tombstones_key(type_name), state_id): epoch_micros(state["updated_at"])}
        layout = self._layout(type_name, definitions.get(type_name))
        entries = {(layout.states, state_id): epoch_micros(state["updated_at"])}
        if state["expires_at"] is not None:
            entries[(layout.expiry, state_id)] = epoch_micros(state["expires_at"])
        for field, key in layout.indexes:
            member = index_member(state, field)
            if member is not None:
                entries[(key, member.decode())] = 0
        return entries

    def _layout(self, type_name: str, declared: str | None) -> _Layout:
        """The keys a live state of *type_name* is a member of, under *declared* fields."""
        layout = self._layouts.get((type_name, declared))
        if layout is None:
            built = codec.loads(declared) if declared else {}
            encrypted = self._encrypted.get(type_name, frozenset())
            fields = (
                [f for f in declared_fields(declared) if f not in encrypted] if declared else []
            )
            layout = self._layouts[(type_name, declared)] = _Layout(
                self.type_key(type_name),
                self.expiry_key(type_name),
                tuple((f, self.index_key(type_name, f)) for f in fields),
                frozenset(self.index_key(type_name, f) for f in fields if not built[f]),
            )
        return layout

    # -- maintenance ------------------------------------------------------------

    def rewrite(
        self, states: StateRewrite, changes: ChangeRewrite, *, batch_size: int = 500
    ) -> tuple[int, Iterator[int]]:
        """Rewrite documents in place, a batch of states (each with its history) at a time.

        States are walked in id order from ``<prefix>:ids`` (every state that
        has history, tombstones too); one script per batch replaces each
        document only if it is still the one read, keeping its TTL.
        """
        with self._redis():
            total = int(self.client.zcard(self._ids_key))

        def run() -> Iterator[int]:
            after: str | None = None
            while batch := self.state_ids(after, batch_size):
                self._rewrite_batch(batch, states, changes)
                yield len(batch)
                after = batch[-1]

        return total, run()

    def _rewrite_batch(
        self, ids: Sequence[str], states: StateRewrite, changes: ChangeRewrite
    ) -> None:
        with self._redis():
            pipe = self.client.pipeline(transaction=False)
            pipe.mget([self.state_key(i) for i in ids])
            for state_id in ids:
                pipe.lrange(self.history_key(state_id), 0, -1)
            raws, *histories = pipe.execute()
        keys: list[str] = []
        args: list[Any] = []
        for state_id, raw, entries in zip(ids, raws, histories, strict=True):
            new = None if raw is None else states(decode_state(raw))
            if new is not None:
                keys.append(self.state_key(state_id))
                args += ["s", 0, raw, encode_document(new)]
            for entry in entries:
                change = decode_change(entry)
                rewritten = changes(change)
                if rewritten is not None:
                    keys += [self.history_key(state_id), self.pruned_key(state_id)]
                    args += ["h", change["version"], entry, encode_document(rewritten)]
        if keys:
            self._run("rewrite", keys, args)
        self._records.forget(ids)

    def reset(self) -> None:
        """Delete this store's states, history, locks and index entries.

        Declared index definitions stay (as SQL tables and indexes do), and so
        do other keys under the prefix, such as a cache's. Uses ``SCAN``: it is
        meant for tests and demos.
        """
        families = tuple(
            f"{self.prefix}:{family}:"
            for family in (
                "state",
                "history",
                "lock",
                "pruned",
                "type",
                "tombstones",
                "expiry",
                "index",
            )
        )
        singles = {self._types_key, self._log_key, self._ids_key}
        pattern = _GLOB.sub(r"\\\1", self.prefix) + ":*"
        with self._redis():
            doomed: list[Any] = []
            for key in self.client.scan_iter(match=pattern, count=1000):
                name = to_text(key)
                if name in singles or name.startswith(families):
                    doomed.append(key)
                if len(doomed) >= 500:
                    self.client.unlink(*doomed)
                    doomed.clear()
            if doomed:
                self.client.unlink(*doomed)
        self._records.clear()

    def close(self) -> None:
        """Give the kept connections back; close the client if the store made it
        (an application's client stays open)."""
        self._scripts.close()
        if self._owns_client:
            self.client.close()


class _Layout(NamedTuple):
    """The sorted sets a live state of one type belongs to (see :meth:`RedisStore._layout`)."""

    states: str
    expiry: str
    #: (declared field, its index key), in field order.
    indexes: tuple[tuple[str, str], ...]
    #: The index keys of fields whose index is still being built.
    building: frozenset[str]


class _Stale(Exception):
    """An optimistic commit found a state moved on or locked: nothing was written."""
