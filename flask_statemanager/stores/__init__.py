"""Stores, picked by configuration: ``memory``, ``sql`` (SQLite, PostgreSQL) or ``redis``.

:func:`create_store` turns what the application gave — an
``SQLAlchemy`` (Flask-SQLAlchemy) object, a SQLAlchemy ``Engine``, a URL, or
nothing; a Redis client or URL — into a :class:`~.base.Store`: the Redis store,
or a SQL or memory store with, when Redis is configured, the Redis cache in
front. Drivers are imported lazily, with an error that names the extra to
install.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..errors import ConfigurationError
from .base import Store, VersionMismatch, Write
from .memory import MemoryStore

if TYPE_CHECKING:
    from flask import Flask
    from sqlalchemy.engine import Engine

__all__ = ["MemoryStore", "Store", "VersionMismatch", "Write", "create_store"]


def create_store(
    app: Flask | None, settings: Settings, database_manager: Any, redis_manager: Any = None
) -> Store:
    """Build the store an app (or a standalone manager) runs on."""
    redis_source = redis_manager if redis_manager is not None else settings.redis_url
    if settings.store == "redis":
        if redis_source is None:
            raise ConfigurationError(
                "STATEMANAGER_STORE = 'redis' needs a server: set STATEMANAGER_REDIS_URL or "
                "pass redis_manager to the extension."
            )
        from .redis import RedisStore

        return RedisStore(
            redis_client(redis_source),
            prefix=settings.key_prefix,
            owns_client=isinstance(redis_source, str),
        )
    source = database_manager if database_manager is not None else settings.database_uri
    store: Store
    if settings.store == "memory" or (isinstance(source, str) and source.startswith("memory:")):
        store = MemoryStore()
    else:
        from .sql import SQLStore

        engine, owns = _engine(app, settings, source)
        store = SQLStore(engine, table_prefix=settings.table_prefix, owns_engine=owns)
    if redis_source is None:
        return store
    from .cache import CachedStore

    return CachedStore(
        store,
        redis_client(redis_source),
        prefix=settings.key_prefix,
        ttl=settings.cache_ttl,
        timeout=settings.cache_timeout,
        cooldown=settings.cache_cooldown,
    )


def redis_client(source: Any) -> Any:
    """A redis-py client from a client, a URL, or an object with ``client``/``get_client()``.

    The result shares the given client's connection settings; stores that need
    other timeouts derive their own client from its ``connection_pool``.
    """
    try:
        import redis
    except ImportError:  # pragma: no cover - redis is a core dependency
        raise ConfigurationError("Redis needs redis-py: pip install redis") from None
    if isinstance(source, str):
        try:
            return redis.Redis.from_url(source)
        except ValueError as exc:
            raise ConfigurationError(f"Not a Redis URL: {exc}") from None
    if isinstance(source, redis.Redis):
        return source
    getter = getattr(source, "get_client", None)
    candidate = getter() if callable(getter) else getattr(source, "client", None)
    if isinstance(candidate, redis.Redis):
        return candidate
    raise ConfigurationError(
        f"redis_manager must be a redis.Redis client, a URL, or an object with a client "
        f"attribute or get_client(), got {type(source).__name__}."
    )


def _engine(app: Flask | None, settings: Settings, source: Any) -> tuple[Engine, bool]:
    import sqlalchemy as sa

    if isinstance(source, sa.Engine):
        return source, False
    from flask_sqlalchemy import SQLAlchemy

    if isinstance(source, SQLAlchemy):
        from flask import has_app_context

        if app is not None:
            with app.app_context():
                return source.engine, False
        if has_app_context():
            return source.engine, False
        raise ConfigurationError(
            "A Flask-SQLAlchemy database needs an app: call state_manager.init_app(app) "
            "after db.init_app(app), or pass an Engine or URL as database_manager."
        )
    if source is None:
        if app is None:
            raise ConfigurationError(
                "No database configured: call state_manager.init_app(app), or pass "
                "database_manager (an Engine, a URL, or a Flask-SQLAlchemy object)."
            )
        os.makedirs(app.instance_path, exist_ok=True)
        source = "sqlite:///" + os.path.join(app.instance_path, "statemanager.sqlite3")
    if isinstance(source, str | sa.URL):
        return make_engine(str(source) if isinstance(source, sa.URL) else source, settings), True
    raise ConfigurationError(
        f"database_manager must be a Flask-SQLAlchemy object, an Engine or a URL, "
        f"got {type(source).__name__}."
    )


def make_engine(url: str, settings: Settings) -> Engine:
    """A SQLAlchemy engine tuned for the store: WAL SQLite, or psycopg 3 PostgreSQL."""
    import sqlalchemy as sa
    from sqlalchemy import event

    from .. import codec

    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise ConfigurationError(
            "STATEMANAGER_DATABASE_URI is not a database URL; use e.g. "
            "'sqlite:///state.db' or 'postgresql://user@host/db'."
        ) from None
    backend = parsed.get_backend_name()
    options: dict[str, Any] = {}
    if backend == "postgresql":
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ConfigurationError(
                "PostgreSQL needs psycopg 3: pip install 'flask-statemanager[postgres]'."
            ) from None
        options.update(
            json_serializer=codec.dumps_str,
            json_deserializer=codec.loads,
            pool_size=10,
            max_overflow=20,
        )
    elif backend == "sqlite":
        options["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        raise ConfigurationError(
            f"Unsupported database {backend!r}: use SQLite or PostgreSQL "
            "(or STATEMANAGER_STORE='memory')."
        )
    options.update(settings.engine_options)
    engine = sa.create_engine(parsed, **options)
    if backend == "sqlite":
        synchronous = settings.sqlite_synchronous
        in_memory = parsed.database in (None, "", ":memory:")

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.close()

    return engine
