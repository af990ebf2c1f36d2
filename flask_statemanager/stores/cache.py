"""The Redis cache in front of a store: read-through, write-through after commit.

:class:`CachedStore` wraps the SQL (or memory) store. Reads look in Redis first
and fill it from the store on a miss; writes commit in the store, then write
the committed records through. The store stays the truth: Redis may lose
anything at any time, and while it is unreachable every read and write goes on
against the store (the health report says ``degraded``).

Keys
----

``<prefix>:cache:{<state_id>}``
    One string per state, hash-tagged by id: ``<generation>:<version>:<JSON>``
    for a record (version ``0`` and no JSON for an id the store does not have),
    or ``m:<generation>:<token>`` for a *fill lease* (below). Every entry
    expires after ``ttl`` seconds, leases after at most 30.
``<prefix>:cache:generation``
    A string, never expiring: ``n``, the current generation (a number).
``<prefix>:cache:run``
    A string, never expiring: the Redis ``run_id`` of the server instance
    whose start the generation has accounted for (rule 7).

A *hit* is one plain command, ``MGET <generation> <entry>`` (atomic in Redis):
the entry counts only if it starts with the generation it was read with, which
the process checks itself. Everything else (a miss taking or sharing a lease,
fills, write-throughs, invalidations, probes) is one Lua script (``EVALSHA``),
so each decision below is atomic in Redis. Both touch the generation key and
state keys together, so the cache needs one Redis primary, not Redis Cluster.

Why a read never returns a version older than the last committed one
--------------------------------------------------------------------

1. **Generations.** An entry counts only if it carries the current generation
   ``n``; a *bump* (``n`` becomes ``max(n + 1, Redis time in ms)``, so it never
   repeats even if the key is lost) invalidates every entry at once, for every
   process.
2. **Fill leases.** A miss leaves a lease ``m:<n>:<token>`` in the key (or
   shares the one already there); the reader then reads the store and fills
   only if its lease is still in place, or its lease carries the current
   generation and the entry holds a lower version. A write-through *deletes*
   a lease. So a slow reader whose store read predates
   a commit cannot leave its old version behind: if it fills before the
   commit's write-through, the write-through replaces the lower version; if
   after, its lease is gone; and a lease taken after the commit precedes a
   store read that sees the commit. Leases also make eviction harmless: an
   evicted entry is absent, and nothing but a lease-holding fill creates an
   entry from nothing.
3. **Write-through** (after the store committed) replaces only an entry of the
   current generation with a *lower* version, and never creates one: a missing
   key may have held a newer version that was evicted, so the next read fills
   it instead. Two writers' write-throughs in any order leave the higher
   version. It carries the generation its process last saw *before* the
   commit (from any earlier reply, so no extra round trip); if the
   generation has changed since, it deletes the keys instead of writing
   (deleting is always safe: the next read fills from the store).
4. **Operations that may lower a version bump.** ``restore(replace=True)``
   (``flask states import --replace``), the purges of ``prune`` and
   ``reset`` delete the keys and bump the generation after the store
   changed. Within one generation versions only grow, which is what rules 2
   and 3 rely on; across the bump, no fill (its lease is of the old
   generation) and no write-through (it knew the old generation) that
   started before can install anything. ``rewrite`` (``rotate-keys``) keeps
   versions but deletes each batch's rewritten entries as it goes, so no old
   document (plaintext of a newly encrypted field, ciphertext under a retired
   key) stays in Redis, and bumps at the end.
5. **Unknown outcomes invalidate.** When the store fails mid-write (the commit
   may or may not have happened), the touched keys are deleted.
6. **A process that saw Redis fail bumps before it uses Redis again.** Any
   error or timeout (or a ``BaseException`` such as ``gevent.Timeout`` in the
   middle of a call, which is re-raised) opens the circuit: for ``cooldown`` seconds the process
   leaves Redis alone, and writes commit without write-through, so Redis may
   keep older versions. The first call after the cooldown (or a health check)
   is the half-open probe, and its script bumps the generation before it
   reads; until that succeeds the circuit stays open. A write-through or
   invalidation skipped while the probe is in flight (its bump may already
   have run) keeps the probe from closing the circuit: the next call bumps
   again. One failed or skipped write-through therefore invalidates the
   whole cache before the writer's process reads it again.
7. **A restarted or replaced server is bumped before its first read.** Redis
   may come back from its AOF or RDB file with old entries *and* the old
   generation and run keys. A restart or failover always drops the TCP
   connections to the server (a restart ends the process; Sentinel kills the
   clients of both the promoted and the demoted server), so the check runs per
   connection: every connection the cache opens runs one script, as part of
   connecting and before the pool hands it out for any command, that compares
   the stored ``run`` with the server's own ``run_id`` (``INFO server``, which
   changes on every restart and differs on a promoted replica) and bumps when
   they differ or the generation is missing. If the check fails, the
   connection is closed unused. So after a restart no process, whether it saw
   the outage or not, new or old, reads an entry written before it: its old
   connections are gone, and its new ones bumped first. (This needs the cache
   to talk to Redis directly or through Sentinel, not through a proxy that
   keeps client connections open while the server behind it changes.)

The guarantee this gives: a read starting after a write returned sees that
write or a newer one, provided Redis was reachable for the write-through, or
was restarted, or the writer's process has since been back in touch with it.

The gap that remains is a **partial network partition**: a writer that cannot
reach Redis commits, while other processes still can (or Redis was paused and
resumes without a restart). Those processes may read the older entry until the
writer's process bumps (its next call or health check after ``cooldown`` once
Redis is reachable from it) or the entry's ``ttl`` ends. Closing that gap needs
a fence the writer can always reach, which only the database is: e.g. a cache
epoch row bumped in the write's transaction and compared on every cached read
(a database round trip per read, which defeats the cache), or refusing writes
while the cache cannot be invalidated (which gives up availability). This
cache chooses availability with bounded staleness in that one case.

Timeouts
--------

The cache talks to Redis through its own client, built from the given
client's connection settings with ``socket_timeout`` and
``socket_connect_timeout`` of ``timeout / 4``, one retry without backoff, and
no ``CLIENT SETINFO`` on connecting: a reply that times out, the reconnection
and the retry's reply are four such waits at most, so a Redis command gives up
within ``timeout`` (on a paused server the first call takes about
``timeout / 2``; the restart check of a new connection is part of connecting,
with the same waits, and so is ``SELECT`` for a database other than 0).

A read that misses runs up to three steps: the ``MGET`` (whose answer the
lease script does not repeat), the lease script, and after the store read
the fill. Each read has a budget of ``timeout`` seconds of Redis time (its
store read does not count): a step starts only while at least one socket wait
is left, otherwise the read goes on with the store alone and leaves Redis as
it is (a lease left behind just expires). A step that has started is bounded
by its socket waits, so a read spends at most a little over ``timeout`` in
Redis even when each reply comes just before its timeout. After a failure the
circuit keeps every call away from Redis for ``cooldown`` seconds.
Redis errors never reach the caller: they are logged on the
``flask_statemanager`` logger, counted (:meth:`CachedStore.cache_stats`), and the
store answers instead.

The Redis user needs ``MGET``, ``EVAL``/``EVALSHA``/``SCRIPT LOAD`` and the
commands the scripts run (``GET``, ``SET``, ``DEL``, ``TYPE``, ``TIME``, ``INFO``),
``SCAN``/``UNLINK`` (for :meth:`~CachedStore.reset`), and the keys above.

Every app sharing a Redis server must use its own ``STATEMANAGER_KEY_PREFIX``
unless it also shares the database: cache keys name states, not databases.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import codec
from ..definitions import TypeDefinition
from ..errors import BackendUnavailableError, StateManagerError
from ..query import Query
from ..records import Change, State, isoformat, utcnow
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
)
from .redis_calls import Scripts

logger = logging.getLogger("flask_statemanager")

T = TypeVar("T")

#: How long a fill lease lives at most: a store read slower than this fills nothing.
LEASE_SECONDS = 30.0

# Connection settings that belong to the given client's pool, or that the cache
# sets itself; everything else (address, database, credentials, TLS) is kept. A
# Sentinel-managed connection keeps ``connection_pool``: it asks that pool for
# the current primary, and connects to it with the cache's timeouts.
_POOL_OWNED = frozenset(
    {
        "cache",
        "cache_config",
        "decode_responses",
        "himport_registry",
        "maint_notifications_config",
        "maint_notifications_pool_handler",
        "max_connections",
        "orig_host_address",
        "orig_socket_connect_timeout",
        "orig_socket_timeout",
        "retry",
        "retry_on_error",
        "retry_on_timeout",
        "socket_connect_timeout",
        "socket_timeout",
    }
)

# -- Lua ----------------------------------------------------------------------------
#
# KEYS[1] is always the generation key, KEYS[2..] the state keys; ARGV[1] is
# "1" when the calling process must bump before it uses the cache.

_BUMP = """
local function bump_from(n)
  local t = redis.call('TIME')
  local floor = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if n == nil or n < floor then n = floor else n = n + 1 end
  redis.call('SET', KEYS[1], string.format('%d', n))
  return n
end
"""

# Run on every new connection before anything else (rule 7): KEYS[1] the
# generation, KEYS[2] the run key. -> the generation. A generation hash left
# by an older version of this module is replaced (its entries are then older).
_CONNECT = (
    _BUMP
    + """
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local kind = redis.call('TYPE', KEYS[1])['ok']
local n = nil
local stale = true
if kind == 'string' then
  n = tonumber(redis.call('GET', KEYS[1]))
  stale = n == nil or redis.call('GET', KEYS[2]) ~= run
else
  if kind == 'hash' then n = tonumber(redis.call('HGET', KEYS[1], 'n')) end
  redis.call('DEL', KEYS[1])
end
if stale then
  n = bump_from(n)
  redis.call('SET', KEYS[2], run)
end
return string.format('%d', n)
"""
)

_GENERATION = (
    _BUMP
    + """
local function generation(bump)
  local n = tonumber(redis.call('GET', KEYS[1]))
  if n == nil or bump then n = bump_from(n) end
  return string.format('%d', n)
end
local function version_of(entry)
  return tonumber(string.match(entry, '^%d+:(%d+):'))
end
local g = generation(ARGV[1] == '1')
local live = g .. ':'
local lease = 'm:' .. live
"""
)

# -> {generation, entry or lease per key}. A miss takes a lease (ARGV[2] its
# token, ARGV[3] its lifetime in ms) or shares the current one.
_READ = (
    _GENERATION
    + """
local out = {g}
for i = 2, #KEYS do
  local entry = redis.call('GET', KEYS[i])
  if not (entry and string.sub(entry, 1, #live) == live) then
    if not (entry and string.sub(entry, 1, #lease) == lease) then
      entry = lease .. ARGV[2]
      redis.call('SET', KEYS[i], entry, 'PX', ARGV[3])
    end
  end
  out[i] = entry
end
return out
"""
)

# ARGV[2]: ttl in ms; then per key: the lease from the read, version, JSON.
# -> how many entries were filled. Only a lease of the current generation may
# replace an entry it does not hold (one of a lower version).
_FILL = (
    _GENERATION
    + """
local filled = 0
for i = 2, #KEYS do
  local j = 3 * i - 3
  local entry = redis.call('GET', KEYS[i])
  local ok = false
  local current = string.sub(ARGV[j], 1, #lease) == lease
  if entry and entry == ARGV[j] and current then
    ok = true
  elseif entry and current and string.sub(entry, 1, #live) == live then
    ok = version_of(entry) < tonumber(ARGV[j + 1])
  end
  if ok then
    redis.call('SET', KEYS[i], live .. ARGV[j + 1] .. ':' .. ARGV[j + 2], 'PX', ARGV[2])
    filled = filled + 1
  end
end
return filled
"""
)

# ARGV[2]: the generation the writer knew before it committed, ARGV[3]: ttl in
# ms; then per key: version, JSON. -> {generation, how many entries were
# replaced}. If the generation changed since, the keys are deleted instead.
_WRITE = (
    _GENERATION
    + """
if g ~= ARGV[2] then
  for i = 2, #KEYS do
    redis.call('DEL', KEYS[i])
  end
  return {g, 0}
end
local written = 0
for i = 2, #KEYS do
  local j = 2 * i
  local entry = redis.call('GET', KEYS[i])
  if entry and string.sub(entry, 1, #live) == live then
    if version_of(entry) < tonumber(ARGV[j]) then
      redis.call('SET', KEYS[i], live .. ARGV[j] .. ':' .. ARGV[j + 1], 'PX', ARGV[3])
      written = written + 1
    end
  elseif entry and string.sub(entry, 1, #lease) == lease then
    redis.call('DEL', KEYS[i])
  end
end
return {g, written}
"""
)

# Delete the state keys (bumping first when ARGV[1] is "1"); -> the generation.
_INVALIDATE = (
    _GENERATION
    + """
for i = 2, #KEYS do
  redis.call('DEL', KEYS[i])
end
return g
"""
)

# -> the generation: the health check, and the half-open probe.
_PROBE = _GENERATION + "return g"

# -> {generation, entry of the current generation or false per key}; writes no lease.
_PEEK = (
    _GENERATION
    + """
local out = {g}
for i = 2, #KEYS do
  local entry = redis.call('GET', KEYS[i])
  if entry and string.sub(entry, 1, #live) == live then out[i] = entry else out[i] = false end
end
return out
"""
)


_MISS: Any = object()


class _Skipped(Exception):
    """Redis is not being used right now (circuit open, time up), or the call failed."""


class _Budget:
    """The Redis time one read has left (``timeout``); its store reads do not count.

    A step (taking a lease, filling) starts only while at least one socket
    wait (``timeout / 4``) is left, so a read that met a slow Redis on its
    way in leaves it alone on its way out.
    """

    __slots__ = ("left", "step")

    def __init__(self, timeout: float) -> None:
        self.left = timeout
        self.step = timeout / 4

    def spend(self, since: float) -> None:
        """Charge the time since *since* (a ``time.perf_counter()`` reading)."""
        self.left -= time.perf_counter() - since

    def exhausted(self, since: float | None = None) -> bool:
        """Whether no further step fits (counting the time since *since* as spent too)."""
        pending = 0.0 if since is None else time.perf_counter() - since
        return self.left - pending < self.step


class _Circuit:
    """The circuit breaker, and whether this process owes the generation a bump.

    Closed: calls go to Redis. After a failure it opens for ``cooldown``
    seconds; then one call (the half-open probe) goes through and bumps the
    generation; only its success closes the circuit, and only if nothing
    since it started failed or was skipped that the bump has to make up for.
    """

    def __init__(self, cooldown: float) -> None:
        self.cooldown = cooldown
        self._lock = threading.Lock()
        self._open_until = 0.0
        self.must_bump = False
        self.faults = 0
        self.skips = 0
        self.last_error: str | None = None

    def admit(self) -> tuple[bool, tuple[int, int]] | None:
        """``None`` to skip Redis, else (whether to bump, faults and skips seen so far)."""
        if not self.must_bump:
            # Closed: no lock needed. A failure racing with this call is as if it
            # came just after the call was admitted, as it could with the lock.
            return False, (self.faults, self.skips)
        with self._lock:
            now = time.monotonic()
            if now < self._open_until:
                return None
            if self.must_bump:
                # The half-open probe: everyone else keeps skipping until it is back.
                self._open_until = now + self.cooldown
            return self.must_bump, (self.faults, self.skips)

    def succeeded(self, bumped: bool, seen: tuple[int, int]) -> bool:
        """Record a call that worked; ``True`` if it closed the circuit."""
        if not bumped:
            return False
        with self._lock:
            if not self.must_bump:
                return False
            if seen == (self.faults, self.skips):
                self.must_bump = False
                self._open_until = 0.0
                return True
            if seen[0] == self.faults:
                # Only skipped writes since the probe's bump: bump again at once.
                self._open_until = 0.0
            # A failure since the probe started owes a bump of its own, after the cooldown.
            return False

    def failed(self, error: str) -> None:
        with self._lock:
            self.faults += 1
            # Set before ``must_bump``: a lock-free admit that sees the bump owed
            # then takes the lock and sees the cooldown too.
            self._open_until = time.monotonic() + self.cooldown
            self.must_bump = True
            self._open_until = time.monotonic() + self.cooldown
            self.last_error = error

    def skipped(self) -> None:
        """A write-through or invalidation left Redis alone: a bump is owed.

        The circuit was open, or its probe in flight (whose bump may already
        have run, so it must not close the circuit). If a probe closed it in
        the meantime, the next call probes again at once.
        """
        with self._lock:
            self.skips += 1
            if not self.must_bump:
                self._open_until = 0.0
                self.must_bump = True

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"`` (a probe is due)."""
        with self._lock:
            if not self.must_bump:
                return "closed"
            return "open" if time.monotonic() < self._open_until else "half-open"

    def retry_in(self) -> float:
        with self._lock:
            return max(0.0, self._open_until - time.monotonic())


class CachedStore(Store):
    """A store with a Redis cache in front (the protocol is in the module docstring).

    :param inner: the store that holds the truth (SQL or memory).
    :param client: a redis-py client; the cache makes its own from its
        connection settings, with the timeouts below, and never changes it.
    :param prefix: first part of every cache key.
    :param ttl: seconds an entry stays in Redis after it was filled or written.
    :param timeout: most seconds one Redis call (with its retry) may take.
    :param cooldown: seconds to leave Redis alone after it failed.
    """

    def __init__(
        self,
        inner: Store,
        client: redis.Redis,
        *,
        prefix: str,
        ttl: float,
        timeout: float,
        cooldown: float,
    ) -> None:
        self.inner = inner
        self.kind = inner.kind  # type: ignore[misc]  # health and metrics name the store
        self.embedded = inner.embedded
        self.prefix = prefix
        self.ttl = ttl
        self.timeout = timeout
        self._ttl_ms = str(max(1, round(ttl * 1000)))
        self._lease_ms = str(max(1, round(min(ttl, LEASE_SECONDS) * 1000)))
        self._generation_key = f"{prefix}:cache:generation"
        self._run_key = f"{prefix}:cache:run"
        self._key_prefix = f"{prefix}:cache:{{"
        self.client = _derive_client(client, timeout, self._generation_key, self._run_key)
        self._scripts = Scripts(
            self.client,
            {
                "read": _READ,
                "fill": _FILL,
                "write": _WRITE,
                "invalidate": _INVALIDATE,
                "peek": _PEEK,
                "probe": _PROBE,
            },
        )
        self._circuit = _Circuit(cooldown)
        # The last generation this process saw in a reply: a write-through
        # carries the one read before its commit (rule 3).
        self._generation: bytes | None = None
        self._stats_lock = threading.Lock()
        self._stats = dict.fromkeys(
            ("hits", "misses", "fills", "write_throughs", "invalidations", "errors", "skipped"),
            0,
        )

    # -- keys and entries -----------------------------------------------------------

    def key(self, state_id: str) -> str:
        """The Redis key caching *state_id*."""
        return f"{self._key_prefix}{state_id}}}"

    def _keys(self, state_ids: Iterable[str]) -> list[str]:
        return [self._generation_key, *map(self.key, state_ids)]

    @staticmethod
    def _decode(entry: bytes) -> State | None:
        """``<generation>:<version>:<JSON>`` → the record (``None`` for version 0)."""
        first = entry.index(b":")
        second = entry.index(b":", first + 1)
        if entry[first + 1 : second] == b"0":
            return None
        return State.from_json(codec.loads(memoryview(entry)[second + 1 :]))

    @staticmethod
    def _encode(state: State | None) -> tuple[str, bytes]:
        """A record (or ``None``) → its version and JSON, as the scripts take them."""
        if state is None:
            return "0", b""
        return str(state["version"]), codec.dumps(state.to_json())

    # -- calling Redis --------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                self._stats[name] += delta

    def _call(
        self,
        what: str,
        fn: Callable[[bool], T],
        *,
        owes: bool = False,
        budget: _Budget | None = None,
    ) -> T:
        """Run ``fn(bump)`` against Redis under the circuit breaker.

        :param owes: the call keeps the cache true (a write-through, an
            invalidation): skipping it leaves a bump owed.
        :param budget: a read's Redis time: the call is skipped once it is up,
            and charged with the time the call took.
        :raises _Skipped: the circuit is open, the time is up or the call
            failed (logged and counted); the caller goes on with the store alone.
        """
        admitted = None if budget is not None and budget.exhausted() else self._circuit.admit()
        if admitted is None:
            self._count(skipped=1)
            if owes:
                self._circuit.skipped()
            raise _Skipped
        bump, seen = admitted
        start = time.perf_counter()
        try:
            result = fn(bump)
        except Exception as exc:  # any failure of the cache means: use the store
            self._failed(what, exc)
            raise _Skipped from exc
        except BaseException as exc:  # gevent.Timeout, SystemExit: the outcome is unknown
            self._failed(what, exc)
            raise
        finally:
            if budget is not None:
                budget.spend(start)
        if bump and self._circuit.succeeded(bump, seen):
            logger.info("Redis cache is back; generation bumped, older entries are ignored.")
        return result

    def _script(
        self,
        what: str,
        script: str,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        owes: bool = False,
        budget: _Budget | None = None,
    ) -> Any:
        """Run a Lua script under the circuit breaker; its first argument is the bump flag."""
        return self._call(
            what,
            lambda bump: self._scripts.run(script, keys, ["1" if bump else "0", *args]),
            owes=owes,
            budget=budget,
        )

    def _failed(self, what: str, exc: BaseException) -> None:
        """Open the circuit after a failed call; log and count it."""
        error = _describe(exc)
        self._circuit.failed(error)
        self._count(errors=1)
        logger.warning(
            "Redis cache %s failed (%s); reads and writes go to the database, next try in %.3gs.",
            what,
            error,
            self._circuit.cooldown,
            exc_info=not isinstance(exc, redis.ConnectionError | redis.TimeoutError),
        )

    def _hit(self, generation: bytes | None, entry: bytes | None) -> bool:
        """Whether an entry read together with *generation* (one ``MGET``) is live."""
        return (
            generation is not None
            and entry is not None
            and entry.startswith(generation)
            and entry[len(generation) : len(generation) + 1] == b":"
        )

    def _lookup(
        self, state_ids: Sequence[str], budget: _Budget | None = None, *, fetched: bool = False
    ) -> tuple[dict[str, State | None], dict[str, bytes]]:
        """Cached records (hits), and the fill lease for each miss that got one.

        One ``MGET`` of the generation and the entries (unless *fetched*: the
        caller's own ``MGET`` missed them all); the misses then take or share
        leases in one script, if the *budget* leaves time for it. A process
        that owes a bump runs the script for every id (it bumps first).

        :raises _Skipped: Redis is not available, or the budget is spent.
        """

        def run(bump: bool) -> tuple[dict[str, State | None], dict[str, bytes]]:
            # Decoded here, so a damaged entry counts as a cache failure (and is
            # left behind by the bump that follows) rather than reaching the caller.
            start = time.perf_counter()
            hits: dict[str, State | None] = {}
            leases: dict[str, bytes] = {}
            missing: Sequence[str] = state_ids
            if not bump and not fetched:
                reply = self._scripts.execute(
                    "MGET", self._generation_key, *map(self.key, state_ids)
                )
                generation = self._generation = reply[0]
                missing = []
                for state_id, entry in zip(state_ids, reply[1:], strict=True):
                    if self._hit(generation, entry):
                        hits[state_id] = self._decode(entry)
                    else:
                        missing.append(state_id)
            if missing and budget is not None and not bump and budget.exhausted(start):
                self._count(skipped=1)  # no time left for a lease: the store answers alone
            elif missing:
                reply = self._scripts.run(
                    "read",
                    self._keys(missing),
                    ["1" if bump else "0", os.urandom(8).hex(), self._lease_ms],
                )
                self._generation = reply[0]
                for state_id, entry in zip(missing, reply[1:], strict=True):
                    if entry.startswith(b"m:"):
                        leases[state_id] = entry
                    else:
                        hits[state_id] = self._decode(entry)
            return hits, leases

        return self._call("read", run, budget=budget)

    def _fill(
        self,
        leases: Mapping[str, bytes],
        rows: Mapping[str, State | None],
        budget: _Budget | None = None,
    ) -> int:
        """Install what the store returned for ids read under *leases*; how many went in.

        An id missing from *rows* is cached as absent. A fill whose lease is
        gone and that holds no newer version than the entry changes nothing.
        """
        if not leases:
            return 0
        args: list[Any] = []
        for state_id, lease in leases.items():
            args.extend((lease, *self._encode(rows.get(state_id))))

        try:
            filled = int(
                self._script(
                    "fill",
                    "fill",
                    self._keys(leases),
                    [self._ttl_ms, *args],
                    budget=budget,
                )
            )
        except _Skipped:
            return 0
        self._count(fills=filled)
        return filled

    def _write_through(self, writes: Sequence[Write], known: bytes | None) -> None:
        """Replace cached entries of the committed states that hold a lower version.

        *known* is the generation this process knew before the commit: if it
        changed since (a restore, purge or reset may have lowered a version in
        between), the entries are deleted instead.
        """
        latest: dict[str, State] = {}
        for write in writes:  # a batch may write one state twice: keep the last
            latest[write.state["state_id"]] = write.state
        args: list[Any] = []
        for state in latest.values():
            args.extend(self._encode(state))

        try:
            generation, written = self._script(
                "write-through",
                "write",
                self._keys(latest),
                [known or b"", self._ttl_ms, *args],
                owes=True,
            )
            self._generation = generation
            self._count(write_throughs=int(written))
        except _Skipped:
            pass  # skipped or failed: this process bumps before it reads Redis again

    def _invalidate(self, state_ids: Sequence[str], *, bump: bool = False) -> None:
        """Delete the entries of *state_ids*: always safe, whatever the store holds.

        With *bump*, the generation is bumped too (after a store change that
        may have lowered versions), so no fill or write-through that started
        before it can install anything.
        """

        def run(owed: bool) -> Any:
            return self._scripts.run(
                "invalidate", self._keys(state_ids), ["1" if bump or owed else "0"]
            )

        try:
            self._generation = self._call("invalidation", run, owes=True)
            self._count(invalidations=len(state_ids))
        except _Skipped:
            pass  # skipped or failed: this process bumps before it reads Redis again

    # -- reads ----------------------------------------------------------------------

    def get(self, state_id: str) -> State | None:
        budget = _Budget(self.timeout)
        fetched = False
        if not self._circuit.must_bump:
            # The hit path: one MGET on a kept connection, no lock but the counter's.
            start = time.perf_counter()
            try:
                generation, entry = self._scripts.execute(
                    "MGET", self._generation_key, f"{self._key_prefix}{state_id}}}"
                )
                state = self._decode(entry) if self._hit(generation, entry) else _MISS
            except Exception as exc:  # any failure of the cache means: use the store
                self._failed("read", exc)
                self._count(misses=1)
                return self.inner.get(state_id)
            except BaseException as exc:
                self._failed("read", exc)
                raise
            if state is not _MISS:
                with self._stats_lock:
                    self._stats["hits"] += 1
                return state
            budget.spend(start)
            self._generation = generation
            fetched = True  # the lookup goes straight to the lease
        try:
            hits, leases = self._lookup([state_id], budget, fetched=fetched)
        except _Skipped:
            self._count(misses=1)
            return self.inner.get(state_id)
        if state_id in hits:
            self._count(hits=1)
            return hits[state_id]
        self._count(misses=1)
        row = self.inner.get(state_id)
        self._fill(leases, {state_id: row}, budget)
        return row

    def get_many(self, state_ids: Sequence[str]) -> dict[str, State]:
        ids = list(dict.fromkeys(state_ids))
        if not ids:
            return {}
        budget = _Budget(self.timeout)
        try:
            hits, leases = self._lookup(ids, budget)
        except _Skipped:
            self._count(misses=len(ids))
            return self.inner.get_many(ids)
        missing = [i for i in ids if i not in hits]
        self._count(hits=len(hits), misses=len(missing))
        found = {i: s for i, s in hits.items() if s is not None}
        if missing:
            rows = self.inner.get_many(missing)
            self._fill(leases, rows, budget)
            found.update(rows)
        return {i: found[i] for i in ids if i in found}

    def peek(self, state_id: str) -> State | None:
        """The record Redis would serve for *state_id*, without filling (tests, diagnostics).

        :raises BackendUnavailableError: Redis is not available.
        """

        def run(bump: bool) -> State | None:
            entry = self._scripts.run("peek", self._keys([state_id]), ["1" if bump else "0"])[1]
            return None if entry is None else self._decode(entry)

        try:
            return self._call("peek", run)
        except _Skipped:
            raise BackendUnavailableError(
                f"The Redis cache is unavailable: {self._circuit.last_error}", backend="redis"
            ) from None

    # -- writes -------------------------------------------------------------------------

    def apply(self, state_ids: Sequence[str], plan: Plan) -> Sequence[Write]:
        known = self._generation  # read before the commit (rule 3)
        try:
            writes = self.inner.apply(state_ids, plan)
        except (VersionMismatch, LostRace):
            raise  # nothing was written
        except StateManagerError as exc:
            if isinstance(exc, BackendUnavailableError):
                self._invalidate(state_ids)  # the commit may have happened
            raise
        except BaseException:
            self._invalidate(state_ids)
            raise
        if writes:
            self._write_through(writes, known)
        return writes

    def restore(self, state: State, changes: Sequence[Change], *, replace: bool = False) -> None:
        """Restore in the store, then drop the state's cache entry (whatever happened).

        A restore with ``replace`` may lower a state's version, which a
        write-through would never store, so the entry is deleted and the
        generation bumped: a fill or write-through that started before the
        restore then installs nothing (rules 2 and 3). Without ``replace``
        the store held nothing for the id, and deleting the entry is enough.
        """
        try:
            self.inner.restore(state, changes, replace=replace)
        finally:
            self._invalidate([state["state_id"]], bump=replace)

    # -- the rest is the store's ----------------------------------------------------------

    def setup(self, types: Iterable[TypeDefinition]) -> None:
        self.inner.setup(types)

    def query(self, query: Query) -> tuple[list[State], int]:
        return self.inner.query(query)

    def scan(self, state_type: str | None = None, batch_size: int = 500) -> Iterator[list[State]]:
        return self.inner.scan(state_type, batch_size)

    def history(self, state_id: str, transition: str | None = None) -> list[Change]:
        return self.inner.history(state_id, transition)

    def recent_changes(self, state_id: str | None, limit: int) -> list[Change]:
        return self.inner.recent_changes(state_id, limit)

    def expired(self, now: datetime, limit: int) -> list[State]:
        return self.inner.expired(now, limit)

    @property
    def primary(self) -> Store:
        return self.inner

    @property
    def component(self) -> str:
        return self.inner.component

    def state_ids(self, after: str | None, limit: int) -> list[str]:
        return self.inner.state_ids(after, limit)

    def stored_ids(self, state_ids: Sequence[str]) -> set[str]:
        return self.inner.stored_ids(state_ids)

    def count(self) -> int:
        return self.inner.count()

    def estimate_count(self) -> tuple[int, bool]:
        return self.inner.estimate_count()

    def tally(self) -> Tally:
        return self.inner.tally()

    def count_type(self, type_name: str, limit: int | None = None) -> int:
        return self.inner.count_type(type_name, limit)

    def type_size(self, type_name: str) -> int:
        return self.inner.type_size(type_name)

    def prune(
        self,
        type_name: str,
        retention: Retention,
        *,
        batch_size: int = 500,
        dry_run: bool = False,
    ) -> Iterator[Pruned]:
        """The store prunes; the entries of the states it purged are deleted.

        A purged id registered again starts over at version 1, and a
        write-through never replaces a higher version: without the deletion,
        the cache would go on serving the old tombstone. Each batch with
        purges also bumps the generation, so a fill or write-through of the
        old tombstone that is still under way installs nothing.
        """
        for batch in self.inner.prune(type_name, retention, batch_size=batch_size, dry_run=dry_run):
            if batch.purged and not dry_run:
                self._invalidate(batch.purged, bump=True)
            yield batch

    def check(self) -> dict[str, Any]:
        return self.inner.check()

    def reset(self) -> None:
        """Empty the store, drop every cache entry and bump the generation."""
        self.inner.reset()
        pattern = _glob_escape(f"{self.prefix}:cache:") + "{*"

        def run(bump: bool) -> Any:  # bumps whether this process owes it or not
            batch: list[Any] = []
            for key in self.client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) == 1000:
                    self.client.unlink(*batch)
                    batch.clear()
            if batch:
                self.client.unlink(*batch)
            # Fills and write-throughs in flight carry the old generation: they go nowhere.
            return self._scripts.run("probe", [self._generation_key], ["1"])

        try:
            self._generation = self._call("reset", run, owes=True)
        except _Skipped:
            pass
        with self._stats_lock:
            self._stats = dict.fromkeys(self._stats, 0)

    def rewrite(
        self, states: StateRewrite, changes: ChangeRewrite, *, batch_size: int = 500
    ) -> tuple[int, Iterator[int]]:
        """Rewrite the store's documents, deleting the rewritten states' entries as it goes.

        After each batch the entries of the states it rewrote are deleted, so
        no old document (e.g. the plaintext of a field that is now encrypted,
        or a ciphertext under a retired key) stays in Redis; a fill that read
        the store before its state was rewritten loses its lease with the
        entry. The generation is bumped at the end as well. If Redis is
        unreachable meanwhile, this process bumps before it reads Redis again
        (the circuit's rule), and other processes' entries end with their TTL.
        """
        rewritten: list[str] = []

        def tracking(state: State) -> State | None:
            new = states(state)
            if new is not None:
                rewritten.append(state["state_id"])
            return new

        total, batches = self.inner.rewrite(tracking, changes, batch_size=batch_size)

        def drop() -> None:
            if rewritten:
                ids = list(rewritten)
                rewritten.clear()
                self._invalidate(ids)

        def run() -> Iterator[int]:
            try:
                for count in batches:
                    drop()
                    yield count
            finally:
                drop()
                try:
                    self._generation = self._call(
                        "invalidation",
                        lambda _bump: self._scripts.run("probe", [self._generation_key], ["1"]),
                        owes=True,
                    )
                except _Skipped:
                    pass

        return total, run()

    def close(self) -> None:
        self._scripts.close()
        self.client.connection_pool.disconnect()
        self.inner.close()

    # -- health and metrics -------------------------------------------------------------

    def components(self) -> dict[str, dict[str, Any]]:
        """``{"redis": {...}}``: ``down`` while the circuit is open or the probe fails.

        The probe runs the generation script, so a health check also serves as
        the half-open probe that brings the cache back after an outage.
        """
        start = time.perf_counter()
        report: dict[str, Any] = {"component": "redis", "time": isoformat(utcnow())}

        def probe(bump: bool) -> Any:
            return self._scripts.run("probe", [self._generation_key], ["1" if bump else "0"])

        try:
            self._generation = self._call("health check", probe)
            report["status"] = "up"
        except _Skipped:
            report["status"] = "down"
            reason = (self._circuit.last_error or "unavailable").rstrip(".")
            report["error"] = (
                f"{reason}; the cache is bypassed, next try in {self._circuit.retry_in():.3g}s"
            )
        report["latency_ms"] = round((time.perf_counter() - start) * 1000, 3)
        report["circuit"] = self._circuit.state
        return {"redis": report}

    @property
    def cache_hit_rate(self) -> float | None:
        with self._stats_lock:
            reads = self._stats["hits"] + self._stats["misses"]
            return None if reads == 0 else self._stats["hits"] / reads

    def cache_stats(self) -> dict[str, Any]:
        """Counters since start: hits, misses, fills, write-throughs, errors, skipped calls.

        ``skipped`` counts calls that left Redis alone because the circuit was
        open, or because a read had used up its time (``timeout``) already.
        """
        with self._stats_lock:
            snapshot: dict[str, Any] = dict(self._stats)
        snapshot["hit_rate"] = self.cache_hit_rate
        snapshot["circuit"] = self._circuit.state
        return snapshot


def _derive_client(
    client: redis.Redis, timeout: float, generation_key: str, run_key: str
) -> redis.Redis:
    """A client for the same server as *client*, with the cache's timeouts and one retry.

    Every connection it opens runs the restart check (rule 7) before it is used.
    """
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k not in _POOL_OWNED}
    kwargs["redis_connect_func"] = _checked_connect(
        kwargs.pop("redis_connect_func", None), generation_key, run_key
    )
    # A call may connect, time out, reconnect and time out again: four waits.
    wait = timeout / 4
    kwargs.update(
        socket_timeout=wait,
        socket_connect_timeout=wait,
        retry=Retry(NoBackoff(), 1),
        decode_responses=False,
    )
    try:
        from redis.maint_notifications import MaintNotificationsConfig
    except ImportError:  # pragma: no cover - older redis-py
        pass
    else:
        # Maintenance mode would relax the timeouts to seconds.
        kwargs["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    # No CLIENT SETINFO on connect: two more round trips, each with its own wait.
    for name in ("driver_info", "lib_name", "lib_version"):
        kwargs.pop(name, None)
    if "driver_info" in inspect.signature(redis.connection.AbstractConnection.__init__).parameters:
        kwargs["driver_info"] = None
    else:  # pragma: no cover - older redis-py
        kwargs.update(lib_name=None, lib_version=None)
    own_pool = redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    return redis.Redis(connection_pool=own_pool)


def _checked_connect(
    inner: Callable[[Any], None] | None, generation_key: str, run_key: str
) -> Callable[[Any], None]:
    """The ``redis_connect_func`` running the restart check on a new connection.

    redis-py calls it from ``connect()``, before the pool hands the connection
    out, so no command runs on a connection whose check did not succeed.
    """

    def connected(connection: Any) -> None:
        try:
            if inner is None:
                connection.on_connect()
            else:
                inner(connection)
            connection.send_command("EVAL", _CONNECT, 2, generation_key, run_key)
            connection.read_response()
        except redis.RedisError:
            raise  # redis-py closes the connection
        except BaseException as exc:
            connection.disconnect()
            if isinstance(exc, Exception):
                raise redis.ConnectionError(f"restart check failed: {_describe(exc)}") from exc
            raise

    return connected


_ADDRESS = re.compile(r"(?:rediss?|unix)://\S*|\S+@\S+|[\w.\[\]-]*:\d{2,5}\b|(?<!\w)/\S+")


def _describe(exc: BaseException) -> str:
    """The error's class and first line, without addresses, URLs or paths."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = _ADDRESS.sub("<redis>", text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
