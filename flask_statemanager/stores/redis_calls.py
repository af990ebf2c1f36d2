"""How the Redis store and cache talk to Redis: ``EVALSHA`` on kept connections.

``client.evalsha()`` takes a connection from redis-py's pool and gives it back
on every call, through layers of retry, instrumentation and deprecation
wrappers. Every write of the store is one script call, and in redis-py 8 those
layers cost about as much client time as sending the command and reading its
reply (the Redis cache's write-through is one too). :class:`Scripts` therefore
keeps a few connections between calls on a stack of its own: a call pops one
(or takes one from the pool), runs ``EVALSHA`` on it with redis-py's own
``send_packed_command`` / ``read_response``, and pushes it back. The command
is packed by :func:`pack`, which copies each argument once where redis-py's
packer copies the command again after every argument (the documents are most
of its bytes). An update on the Redis store measured 20–75 µs faster (of
250–350 µs) for the kept connections and another 10–20 µs for the packer on
the 2-core benchmark machine; see ``benchmarks/README.md``. The cache's hit
path, one ``MGET``, runs the same way (:meth:`Scripts.execute`).

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
:data:`KEEP`, and at most a quarter of the pool's ``max_connections``. A call
that finds the stack full gives its connection back to the pool, and so does
every call on a pool whose connections the pool itself must look after
between uses (see :func:`_keepable`): a :class:`redis.BlockingConnectionPool`
(a hard cap the application shares), Sentinel (a connection to a demoted
master is dropped when given back), client-side caching (invalidations are
processed as connections are used) and a ``credential_provider`` (tokens are
renewed on connections given back). RESP3, redis-py 8's default, is kept: a
push message that arrives with a reply is handled by redis-py's parser as it
reads the reply; one that arrives between calls makes the check before the
next use reconnect, as the pool does with a connection holding data; and a
connection a maintenance notification marks for reconnection goes back to
the pool. :meth:`Scripts.close` gives the kept ones back, and calls still
running then give theirs to the pool.
"""

from __future__ import annotations

import hashlib
import os
import select
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis
import redis.sentinel
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError
from redis.utils import HIREDIS_AVAILABLE

#: The most connections kept between calls (threads writing at once beyond this
#: take theirs from the pool, as every redis-py command does).
KEEP = 8
#: ``select.poll`` where the platform has it (not on Windows: ``can_read`` there).
_POLL = getattr(select, "poll", None)


class Scripts:
    """A store's Lua scripts by name (their sources in :attr:`sources`), run with
    :meth:`run`; other commands run the same way with :meth:`execute`."""

    def __init__(self, client: redis.Redis, sources: Mapping[str, str]) -> None:
        self._pool = client.connection_pool
        self.sources = dict(sources)
        self._shas = {
            name: hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).hexdigest()
            for name, text in self.sources.items()
        }
        self._keep = _keepable(self._pool)
        # Commands are packed by :func:`pack` where redis-py would use its own
        # Python packer on connections that may be kept; the others are the
        # pool's to look after (a client-side cache's connection handles
        # invalidations in its own send_command), and another packer (hiredis',
        # an application's) may encode text its own way.
        python_packer = not HIREDIS_AVAILABLE and not _option(self._pool, "command_packer")
        self._encoder = self._pool.get_encoder() if self._keep and python_packer else None
        self._idle: deque[Any] = deque()
        self._lock = threading.Lock()  # the stack's bound: its length, then append
        self._pid = os.getpid()

    def run(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """``EVALSHA`` script *name*; raises redis-py's errors, as ``client.evalsha`` does."""
        return self._on_connection(lambda connection: self._evalsha(connection, name, keys, args))

    def execute(self, *command: Any) -> Any:
        """Any other command (say ``MGET``) the same way: its reply as the connection
        reads it (the client's response callbacks are not applied)."""
        return self._on_connection(lambda connection: self._command(connection, command))

    def _on_connection(self, call: Callable[[Any], Any]) -> Any:
        connection = self._take()
        clean = False  # True once a whole reply was read: the connection may be kept
        try:
            reply = connection.retry.call_with_retry(
                lambda: call(connection), lambda _error: connection.disconnect()
            )
            clean = True
        except ResponseError:  # a Redis error is a whole reply too
            clean = True
            raise
        finally:
            if clean:
                self._give_back(connection)
            else:  # anything else, a KeyboardInterrupt included: never reuse it
                connection.disconnect()
                self._pool.release(connection)
        return reply

    def close(self) -> None:
        """Give every kept connection back to the pool; keep none from now on."""
        self._keep = 0
        while self._idle:
            try:
                connection = self._idle.pop()
            except IndexError:  # another thread took the last one
                return
            self._pool.release(connection)

    def _evalsha(self, connection: Any, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        command = (b"EVALSHA", self._shas[name], len(keys), *keys, *args)
        try:
            self._send(connection, command)
            return connection.read_response()
        except NoScriptError:
            connection.send_command("SCRIPT", "LOAD", self.sources[name])
            connection.read_response()
            self._send(connection, command)
            return connection.read_response()

    def _command(self, connection: Any, command: tuple[Any, ...]) -> Any:
        self._send(connection, command)
        return connection.read_response()

    def _send(self, connection: Any, command: tuple[Any, ...]) -> None:
        if self._encoder is None:
            connection.send_command(*command)
        else:
            connection.send_packed_command(pack(self._encoder, command))

    def _take(self) -> Any:
        if self._pid != os.getpid():  # forked: the parent's sockets are not ours to use
            self._idle = deque()
            self._pid = os.getpid()
        try:
            connection = self._idle.pop()
        except IndexError:
            return self._pool.get_connection()  # checked by the pool
        try:
            _check(connection)
        except BaseException:  # say a gevent.Timeout in poll(): never lose the connection
            connection.disconnect()
            self._pool.release(connection)
            raise
        return connection

    def _give_back(self, connection: Any) -> None:
        should_reconnect = getattr(connection, "should_reconnect", None)  # redis-py >= 7
        if self._keep and not (should_reconnect and should_reconnect()):
            with self._lock:
                if len(self._idle) < self._keep:
                    self._idle.append(connection)
                    return
        self._pool.release(connection)


def pack(encoder: Any, items: Sequence[Any]) -> list[bytes]:
    """*items* as one RESP command, encoded as redis-py's *encoder* encodes them.

    redis-py's own packer joins the command again after every argument, which
    copies the state and history documents over and over: this joins once.
    As there, the command name is UTF-8 and split at spaces (``"CLIENT
    TRACKING"``); then ``str`` is encoded with the client's encoding, ``int``
    written in decimal, ``bytes`` taken as they are, and any other argument
    goes to the encoder, which rejects what redis-py rejects (``bool``,
    ``None``, …).
    """
    name = items[0].encode() if isinstance(items[0], str) else items[0]
    if b" " in name:
        items = (*name.split(), *items[1:])
    else:
        items = (name, *items[1:])
    encoding, errors = encoder.encoding, encoder.encoding_errors
    parts = [b"*%d\r\n" % len(items)]
    for item in items:
        kind = type(item)
        if kind is bytes:
            data = item
        elif kind is str:
            data = item.encode(encoding, errors)
        elif kind is int:
            data = b"%d" % item
        else:
            data = bytes(encoder.encode(item))
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return [b"".join(parts)]


def _keepable(pool: Any) -> int:
    """How many connections of *pool* may be kept between calls (0: none)."""
    if isinstance(pool, (redis.BlockingConnectionPool, redis.sentinel.SentinelConnectionPool)):
        return 0
    if _option(pool, "credential_provider"):
        return 0
    if _option(pool, "cache") is not None or getattr(pool, "cache", None) is not None:
        return 0
    return min(KEEP, int(getattr(pool, "max_connections", 0)) // 4)


def _option(pool: Any, name: str) -> Any:
    """The connection option *name* of *pool* (``None`` when not given)."""
    return getattr(pool, "connection_kwargs", {}).get(name)


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
