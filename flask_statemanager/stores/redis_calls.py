"""How the Redis store runs its Lua scripts: ``EVALSHA`` on connections it keeps.

``client.evalsha()`` takes a connection from redis-py's pool and gives it back
on every call, through layers of retry, instrumentation and deprecation
wrappers. Every write of the store is one script call, and in redis-py 8 those
layers cost about as much client time as sending the command and reading its
reply. :class:`Scripts` therefore keeps a few connections between calls on a
stack of its own: a call pops one (or takes one from the pool), runs
``EVALSHA`` on it with redis-py's own ``send_command`` / ``read_response``, and
pushes it back. An update on the Redis store measured 30–75 µs faster (of
250–350 µs) on the 2-core benchmark machine; see ``benchmarks/README.md``.

What redis-py's call does, this does too:

- before each use, a kept connection is checked as the pool checks every
  connection it hands out: one the server closed (``timeout``, ``CLIENT
  KILL``, a restart) or that holds unexpected data is reconnected;
- retries: the connection's own ``Retry`` (the client's setting) resends the
  call after a connection error or timeout, on a new socket — a resent
  commit recognises its own first entry (``commit.lua``);
- ``NOSCRIPT`` (a restarted or flushed server) loads the script and runs it
  again;
- a connection goes back on the stack only after a whole reply was read (a
  result or a Redis error); after anything else — a timeout, a dropped socket,
  a ``KeyboardInterrupt`` mid-read — it is disconnected and returned to the
  pool, so no later call reads another call's reply;
- a forked child never uses its parent's connections (checked on every call,
  since some servers fork without Python's fork hooks).

Kept connections are out of the pool, so their number is bounded: at most
:data:`KEEP`, and at most a quarter of the pool's ``max_connections``; a
:class:`redis.BlockingConnectionPool` (a hard cap the application shares) keeps
none. A call that finds the stack full gives its connection back to the pool.
:meth:`Scripts.close` gives the kept ones back.
"""

from __future__ import annotations

import hashlib
import os
import select
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

#: The most connections kept between calls (threads writing at once beyond this
#: take theirs from the pool, as every redis-py command does).
KEEP = 8


class Scripts:
    """The store's Lua scripts by name (their sources in :attr:`sources`), run with :meth:`run`."""

    def __init__(self, client: redis.Redis, sources: Mapping[str, str]) -> None:
        self._pool = client.connection_pool
        self.sources = dict(sources)
        self._shas = {
            name: hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).hexdigest()
            for name, text in self.sources.items()
        }
        if isinstance(self._pool, redis.BlockingConnectionPool):
            self._keep = 0
        else:
            self._keep = min(KEEP, int(getattr(self._pool, "max_connections", 0)) // 4)
        self._idle: deque[Any] = deque()
        self._pid = os.getpid()

    def run(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """``EVALSHA`` script *name*; raises redis-py's errors, as ``client.evalsha`` does."""
        connection = self._take()
        try:
            reply = connection.retry.call_with_retry(
                lambda: self._evalsha(connection, name, keys, args),
                lambda _error: connection.disconnect(),
            )
        except ResponseError:  # the whole reply was read: the connection is clean
            self._give_back(connection)
            raise
        except BaseException:
            connection.disconnect()
            self._pool.release(connection)
            raise
        self._give_back(connection)
        return reply

    def close(self) -> None:
        """Give every kept connection back to the pool."""
        while self._idle:
            try:
                connection = self._idle.pop()
            except IndexError:  # another thread took the last one
                return
            self._pool.release(connection)

    def _evalsha(self, connection: Any, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        sha = self._shas[name]
        try:
            connection.send_command("EVALSHA", sha, len(keys), *keys, *args)
            return connection.read_response()
        except NoScriptError:
            connection.send_command("SCRIPT", "LOAD", self.sources[name])
            connection.read_response()
            connection.send_command("EVALSHA", sha, len(keys), *keys, *args)
            return connection.read_response()

    def _take(self) -> Any:
        if self._pid != os.getpid():  # forked: the parent's sockets are not ours to use
            self._idle = deque()
            self._pid = os.getpid()
        try:
            connection = self._idle.pop()
        except IndexError:
            return self._pool.get_connection()  # checked by the pool
        _check(connection)
        return connection

    def _give_back(self, connection: Any) -> None:
        should_reconnect = getattr(connection, "should_reconnect", None)  # redis-py >= 7
        if len(self._idle) < self._keep and not (should_reconnect and should_reconnect()):
            self._idle.append(connection)
        else:
            self._pool.release(connection)


def _check(connection: Any) -> None:
    """The pool's check of a connection it hands out, with one ``poll`` when idle.

    ``can_read()`` switches the socket to non-blocking and back around a
    ``recv``; a ``poll`` answers the common case — nothing to read, not closed —
    in one system call. Anything else goes the pool's way: a connection the
    server closed, or holding unexpected data, is disconnected (the next send
    reconnects).
    """
    sock = getattr(connection, "_sock", None)  # redis-py's socket, None when disconnected
    if sock is not None and _POLL is not None:
        poller = _POLL()
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return
    try:
        if connection.can_read():
            connection.disconnect()  # unexpected data: start afresh
    except (ConnectionError, TimeoutError, OSError):
        connection.disconnect()  # closed by the server


#: ``select.poll`` where the platform has it (not on Windows: ``can_read`` there).
_POLL = getattr(select, "poll", None)
