"""Every ``STATEMANAGER_*`` configuration key, with its default and meaning.

``init_app`` applies these defaults with ``app.config.setdefault`` and then
checks the values, so a wrong setting fails at start-up with a message naming
the key, not later in a request.
"""

from __future__ import annotations

import binascii
import math
from base64 import urlsafe_b64decode
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .codec import DEFAULT_MAX_DEPTH
from .errors import ConfigurationError

#: ``(key, default, one-line description)`` for every setting.
SETTINGS: tuple[tuple[str, Any, str], ...] = (
    (
        "STATEMANAGER_STORE",
        None,
        "Store kind: 'sql', 'memory' or 'redis' (states and history in Redis alone); None "
        "picks it from the database URI.",
    ),
    (
        "STATEMANAGER_DATABASE_URI",
        None,
        "Database URL (sqlite:///..., postgresql://..., memory://); None means a SQLite file "
        "in the app's instance folder, unless database_manager was given.",
    ),
    (
        "STATEMANAGER_ENGINE_OPTIONS",
        {},
        "Extra keyword arguments for sqlalchemy.create_engine when the extension makes its own.",
    ),
    ("STATEMANAGER_TABLE_PREFIX", "statemanager_", "Prefix of the states and history table names."),
    (
        "STATEMANAGER_REDIS_URL",
        None,
        "Redis URL: the cache in front of the SQL store, or the Redis store's server. A "
        "redis_manager given to the extension takes precedence; neither means no cache.",
    ),
    (
        "STATEMANAGER_KEY_PREFIX",
        "statemanager",
        "First part of every Redis key the extension writes; apps with different databases "
        "sharing a Redis server need different prefixes.",
    ),
    (
        "STATEMANAGER_CACHE_TTL",
        3600,
        "Seconds a cached state lives in Redis after it was filled or written through.",
    ),
    (
        "STATEMANAGER_CACHE_TIMEOUT",
        0.1,
        "Most seconds one Redis call may take, its one retry included, before the cache goes "
        "on without Redis.",
    ),
    (
        "STATEMANAGER_CACHE_COOLDOWN",
        1.0,
        "Seconds the cache leaves Redis alone after a failure before trying it again.",
    ),
    (
        "STATEMANAGER_SWEEP_INTERVAL",
        None,
        "Seconds between background TTL sweeps in each process; None sweeps only lazily on "
        "read and through `flask states sweep`.",
    ),
    (
        "STATEMANAGER_SQLITE_SYNCHRONOUS",
        "FULL",
        "SQLite PRAGMA synchronous for the extension's own engine: FULL survives power loss, "
        "NORMAL only process crashes.",
    ),
    (
        "STATEMANAGER_MAX_STATE_BYTES",
        1024 * 1024,
        "Largest encoded size of a state's data plus metadata, in bytes.",
    ),
    (
        "STATEMANAGER_MAX_DEPTH",
        DEFAULT_MAX_DEPTH,
        "Deepest nesting of objects and lists in data or metadata.",
    ),
    (
        "STATEMANAGER_MAX_STATES_PER_TYPE",
        None,
        "Most live states of one type; registering beyond it raises StateLimitError. None: no "
        "limit. A type's own max_states takes precedence.",
    ),
    (
        "STATEMANAGER_PURGE_DELETED_AFTER",
        None,
        "Seconds after which `flask states prune` removes a deleted state with its history; "
        "None keeps them. A type's own purge_deleted_after takes precedence.",
    ),
    ("STATEMANAGER_MAX_PER_PAGE", 500, "Largest page size accepted by searches."),
    (
        "STATEMANAGER_EXPIRE_ON_READ",
        True,
        "Record the EXPIRE change of a state whose TTL passed when a read finds it.",
    ),
    (
        "STATEMANAGER_CALLBACK_MODE",
        "sync",
        "'sync' runs callbacks after the commit in the caller's thread; 'thread' in a pool.",
    ),
    ("STATEMANAGER_CALLBACK_RETRIES", 2, "Extra attempts for a callback that raised."),
    ("STATEMANAGER_CALLBACK_WORKERS", 4, "Thread pool size when CALLBACK_MODE is 'thread'."),
    (
        "STATEMANAGER_ENCRYPTION_KEYS",
        None,
        "Fernet keys for the types' encrypted_fields: a list, or one comma-separated string. "
        "The first encrypts, every one decrypts; None means no encryption.",
    ),
    (
        "STATEMANAGER_WRITE_RETRIES",
        50,
        "Attempts of a last-write-wins write that keeps losing compare-and-set races.",
    ),
    (
        "STATEMANAGER_HEALTH_URL_PREFIX",
        "/health",
        "URL prefix of the health blueprint (/health, /health/live, /health/ready); None or "
        "'' leaves it out.",
    ),
    (
        "STATEMANAGER_METRICS_URL",
        "/metrics",
        "URL of the Prometheus metrics endpoint, served when the 'metrics' extra "
        "(prometheus-client) is installed; None or '' leaves it out.",
    ),
)

DEFAULTS: dict[str, Any] = {key: default for key, default, _ in SETTINGS}


def parse_keys(value: Any) -> tuple[bytes, ...]:
    """The Fernet keys of ``STATEMANAGER_ENCRYPTION_KEYS``: a list or a comma-separated string.

    :raises ConfigurationError: a key is not 32 url-safe base64-encoded bytes.
    """
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, str | bytes):
        text = value.decode() if isinstance(value, bytes) else value
        items: list[Any] = [k.strip() for k in text.split(",") if k.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ConfigurationError(
            "STATEMANAGER_ENCRYPTION_KEYS must be a list of Fernet keys or a comma-separated "
            f"string, got {type(value).__name__}."
        )
    keys: list[bytes] = []
    for position, item in enumerate(items, 1):
        key = item.encode() if isinstance(item, str) else item
        try:
            valid = isinstance(key, bytes) and len(urlsafe_b64decode(key)) == 32
        except (binascii.Error, ValueError):
            valid = False
        if not valid:
            raise ConfigurationError(
                f"STATEMANAGER_ENCRYPTION_KEYS: key {position} is not a Fernet key (32 url-safe "
                "base64-encoded bytes); make one with "
                "`python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'`."
            )
        keys.append(key)
    return tuple(keys)


@dataclass(frozen=True, slots=True)
class Settings:
    """The checked settings one app runs with."""

    store: str | None
    database_uri: str | None
    engine_options: Mapping[str, Any]
    table_prefix: str
    sqlite_synchronous: str
    max_state_bytes: int
    max_depth: int
    max_per_page: int
    expire_on_read: bool
    callback_mode: str
    callback_retries: int
    callback_workers: int
    write_retries: int
    redis_url: str | None
    key_prefix: str
    cache_ttl: float
    cache_timeout: float
    cache_cooldown: float
    sweep_interval: float | None
    health_url_prefix: str | None
    metrics_url: str | None
    #: The Fernet keys of ``STATEMANAGER_ENCRYPTION_KEYS``, first one encrypting.
    encryption_keys: tuple[bytes, ...] = ()
    max_states_per_type: int | None = None
    purge_deleted_after: float | None = None

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> Settings:
        """Read and check the ``STATEMANAGER_*`` keys of *config* (defaults filled in)."""
        values = {key: config.get(key, default) for key, default in DEFAULTS.items()}

        def positive_int(key: str) -> int:
            value = values[key]
            if type(value) is not int or value < 1:
                raise ConfigurationError(f"{key} must be a positive integer, got {value!r}.")
            return value

        mode = values["STATEMANAGER_CALLBACK_MODE"]
        if mode not in ("sync", "thread"):
            raise ConfigurationError(
                f"STATEMANAGER_CALLBACK_MODE must be 'sync' or 'thread', got {mode!r}."
            )
        store = values["STATEMANAGER_STORE"]
        if store not in (None, "sql", "memory", "redis"):
            raise ConfigurationError(
                f"STATEMANAGER_STORE must be 'sql', 'memory' or 'redis', got {store!r}."
            )

        def seconds(key: str, *, optional: bool = False) -> Any:
            value = values[key]
            if value is None and optional:
                return None
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not 0 < value < math.inf:  # nan and inf are refused too
                raise ConfigurationError(
                    f"{key} must be a positive, finite number of seconds, got {value!r}."
                )
            return float(value)

        key_prefix = values["STATEMANAGER_KEY_PREFIX"]
        if (
            not isinstance(key_prefix, str)
            or not key_prefix
            or any(c in key_prefix for c in " {}\n\r\t")
        ):
            raise ConfigurationError(
                "STATEMANAGER_KEY_PREFIX must be a non-empty string without spaces or braces."
            )
        redis_url = values["STATEMANAGER_REDIS_URL"]
        if redis_url is not None and not (
            isinstance(redis_url, str)
            and redis_url.startswith(("redis://", "rediss://", "unix://"))
        ):
            raise ConfigurationError(
                "STATEMANAGER_REDIS_URL must be a redis://, rediss:// or unix:// URL."
            )
        sync = str(values["STATEMANAGER_SQLITE_SYNCHRONOUS"]).upper()
        if sync not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(
                "STATEMANAGER_SQLITE_SYNCHRONOUS must be OFF, NORMAL, FULL or EXTRA."
            )
        retries = values["STATEMANAGER_CALLBACK_RETRIES"]
        if type(retries) is not int or retries < 0:
            raise ConfigurationError(
                f"STATEMANAGER_CALLBACK_RETRIES must be an integer >= 0, got {retries!r}."
            )
        prefix = values["STATEMANAGER_TABLE_PREFIX"]
        if not isinstance(prefix, str) or not prefix.replace("_", "").isalnum():
            raise ConfigurationError(
                "STATEMANAGER_TABLE_PREFIX must be letters, digits and underscores."
            )
        if len(prefix) > 32:
            # PostgreSQL cuts names at 63 bytes: longer prefixes would make the
            # index names (ix_<prefix>states_type_updated, ...) collide.
            raise ConfigurationError(
                f"STATEMANAGER_TABLE_PREFIX must be at most 32 characters, got {len(prefix)}."
            )

        def url(key: str) -> str | None:
            value = values[key]
            if value is None or value == "":
                return None
            if not isinstance(value, str) or not value.startswith("/") or value == "/":
                raise ConfigurationError(
                    f"{key} must be a path such as '/health' (or None to turn it off), "
                    f"got {value!r}."
                )
            return value.rstrip("/")

        return cls(
            store=store,
            database_uri=values["STATEMANAGER_DATABASE_URI"],
            engine_options=dict(values["STATEMANAGER_ENGINE_OPTIONS"] or {}),
            table_prefix=prefix,
            sqlite_synchronous=sync,
            max_state_bytes=positive_int("STATEMANAGER_MAX_STATE_BYTES"),
            max_depth=positive_int("STATEMANAGER_MAX_DEPTH"),
            max_per_page=positive_int("STATEMANAGER_MAX_PER_PAGE"),
            expire_on_read=bool(values["STATEMANAGER_EXPIRE_ON_READ"]),
            callback_mode=mode,
            callback_retries=retries,
            callback_workers=positive_int("STATEMANAGER_CALLBACK_WORKERS"),
            write_retries=positive_int("STATEMANAGER_WRITE_RETRIES"),
            redis_url=redis_url,
            key_prefix=key_prefix,
            cache_ttl=seconds("STATEMANAGER_CACHE_TTL"),
            cache_timeout=seconds("STATEMANAGER_CACHE_TIMEOUT"),
            cache_cooldown=seconds("STATEMANAGER_CACHE_COOLDOWN"),
            sweep_interval=seconds("STATEMANAGER_SWEEP_INTERVAL", optional=True),
            health_url_prefix=url("STATEMANAGER_HEALTH_URL_PREFIX"),
            metrics_url=url("STATEMANAGER_METRICS_URL"),
            encryption_keys=parse_keys(values["STATEMANAGER_ENCRYPTION_KEYS"]),
            max_states_per_type=(
                None
                if values["STATEMANAGER_MAX_STATES_PER_TYPE"] is None
                else positive_int("STATEMANAGER_MAX_STATES_PER_TYPE")
            ),
            purge_deleted_after=seconds("STATEMANAGER_PURGE_DELETED_AFTER", optional=True),
        )
