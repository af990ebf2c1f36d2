"""The extension: the :class:`StateManager` singleton and its per-app runtime.

Definitions (types, lifecycles, validators, callbacks) are global and live on
the singleton. Everything tied to an app — settings, the store and its
connections, metrics, the callback thread pool — lives in a :class:`Runtime`
stored at ``app.extensions["statemanager"]``, so two apps in one process with
different databases never see each other's states.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, ClassVar

from flask import current_app, has_app_context

from .config import DEFAULTS, Settings
from .definitions import TypeDefinition
from .encryption import Cipher, Encryption
from .engine import Registry, sweep
from .errors import ConfigurationError
from .events import make_executor
from .metrics import Metrics
from .operations import StateOperations
from .stores import Store, create_store

if TYPE_CHECKING:
    from flask import Flask

EXTENSION_KEY = "statemanager"
logger = logging.getLogger("flask_statemanager")


class Runtime:
    """What one app (or the standalone manager) runs with."""

    def __init__(
        self,
        app: Flask | None,
        settings: Settings,
        store: Store,
        types: Mapping[str, TypeDefinition] | None = None,
    ) -> None:
        # Held weakly: the app holds this runtime (app.extensions). An app that
        # is dropped without reset_instance() still releases its store's
        # connections, through the finalizer.
        self._app = None if app is None else weakref.ref(app)
        self._finalizer = None if app is None else weakref.finalize(app, self.close)
        self._closed = False
        self.settings = settings
        self.store = store
        keys = settings.encryption_keys
        #: The encrypted fields of the registry's types, with this app's keys.
        self.encryption = Encryption(Cipher(keys) if keys else None, {} if types is None else types)
        self.metrics = Metrics()
        self.executor: ThreadPoolExecutor | None = (
            make_executor(settings.callback_workers) if settings.callback_mode == "thread" else None
        )
        self._sweeper: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def app(self) -> Flask | None:
        """The app this runtime serves (``None`` standalone, or once it is gone)."""
        return None if self._app is None else self._app()

    def start_sweeper(self, registry: Registry) -> None:
        """Sweep expired states every ``STATEMANAGER_SWEEP_INTERVAL`` seconds in a daemon thread.

        Every worker process may run one: each expiry is still recorded once.
        """
        interval = self.settings.sweep_interval
        if interval is None or self._sweeper is not None:
            return

        def run() -> None:
            while not self._stopping.wait(interval):
                try:
                    # Callbacks and receivers of the EXPIRE changes get the app's context.
                    app = self.app
                    with app.app_context() if app is not None else nullcontext():
                        sweep(registry, self, limit=1000)
                except Exception:  # the database may be down; try again next time
                    logger.warning(
                        "Background TTL sweep failed; retrying in %ss.", interval, exc_info=True
                    )

        self._sweeper = threading.Thread(target=run, name="statemanager-sweeper", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        """Stop the sweeper, finish queued callbacks and release the store's connections."""
        if self._closed:
            return
        self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
        self._stopping.set()
        if self._sweeper is not None and self._sweeper is not threading.current_thread():
            self._sweeper.join()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        self.store.close()


class StateManager(StateOperations):
    """The process-wide state manager; every construction returns the same object.

    ::

        state_manager = StateManager()
        state_manager.init_app(app)

    :param app: initialise this app right away (or call :meth:`init_app` later).
    :param database_manager: a Flask-SQLAlchemy ``SQLAlchemy`` object, a SQLAlchemy
        ``Engine``, or a database URL. Without it, ``STATEMANAGER_DATABASE_URI``
        decides, else a SQLite file in the app's instance folder.
    :param redis_manager: a ``redis.Redis`` client, a URL, or an object with a
        ``client`` attribute or ``get_client()``; kept for the Redis cache and store.
    """

    _instance: ClassVar[StateManager | None] = None
    _instance_lock: ClassVar[threading.Lock] = threading.Lock()

    _registry: Registry
    _lock: threading.RLock
    _apps: weakref.WeakSet[Flask]
    _standalone: Runtime | None
    _database_manager: Any
    _redis_manager: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> StateManager:
        with cls._instance_lock:
            if cls._instance is None:
                instance = super().__new__(cls)
                instance._registry = Registry()
                instance._apps = weakref.WeakSet()
                instance._standalone = None
                instance._database_manager = None
                instance._redis_manager = None
                instance._lock = threading.RLock()
                cls._instance = instance
            return cls._instance

    def __init__(
        self,
        app: Flask | None = None,
        *,
        redis_manager: Any = None,
        database_manager: Any = None,
    ) -> None:
        with self._lock:
            if database_manager is not None and database_manager is not self._database_manager:
                self._database_manager = database_manager
                self._close_standalone()
            if redis_manager is not None:
                self._redis_manager = redis_manager
        if app is not None:
            self.init_app(app)

    @classmethod
    def get_instance(
        cls, *, redis_manager: Any = None, database_manager: Any = None
    ) -> StateManager:
        """The singleton, optionally given the managers it should use."""
        return cls(redis_manager=redis_manager, database_manager=database_manager)

    @classmethod
    def reset_instance(cls) -> None:
        """Forget every definition and close every app's store, in place.

        References to the singleton stay valid; apps must be initialised again.
        Meant for tests (the pytest plugin calls it around each test).
        """
        with cls._instance_lock:
            instance = cls._instance
        if instance is None:
            return
        with instance._lock:
            instance._registry.clear()
            for app in list(instance._apps):
                runtime = app.extensions.pop(EXTENSION_KEY, None)
                if isinstance(runtime, Runtime):
                    runtime.close()
            instance._apps = weakref.WeakSet()
            instance._close_standalone()
            instance._database_manager = None
            instance._redis_manager = None

    def init_app(self, app: Flask) -> None:
        """Configure *app*: settings, store, tables (SQLite and memory) and the CLI.

        Safe to call again: the app's previous store is closed first.

        :raises ConfigurationError: a ``STATEMANAGER_*`` setting is wrong.
        """
        for key, default in DEFAULTS.items():
            app.config.setdefault(key, default)
        settings = Settings.from_mapping(app.config)
        with self._lock:
            previous = app.extensions.pop(EXTENSION_KEY, None)
            if isinstance(previous, Runtime):
                previous.close()
            store = create_store(app, settings, self._database_manager, self._redis_manager)
            try:
                runtime = Runtime(app, settings, store, self._registry.types)
            except BaseException:
                store.close()
                raise
            try:
                # A missing or wrong key fails here, not in the first request.
                runtime.encryption.check_startup()
                # Embedded stores get their tables here; server databases through
                # `flask states init-db`, so no app start-up runs DDL on production.
                if store.embedded:
                    store.setup(self._registry.types.values())
                runtime.encryption.check_stored(store)
            except BaseException:
                runtime.close()
                raise
            runtime.start_sweeper(self._registry)
            app.extensions[EXTENSION_KEY] = runtime
            self._apps.add(app)
        from .cli import states

        if "states" not in app.cli.commands:
            app.cli.add_command(states)
        _register_endpoints(app, settings)

    def create_all(self) -> None:
        """Create the tables and declared indexes of the current app's store (idempotent)."""
        self._runtime().store.setup(self._registry.types.values())

    def _runtime(self) -> Runtime:
        if has_app_context():
            app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
            runtime = app.extensions.get(EXTENSION_KEY)
            if runtime is None:
                raise ConfigurationError(
                    f"StateManager is not initialised on app {app.name!r}: call "
                    "state_manager.init_app(app) in your app factory."
                )
            return runtime  # type: ignore[no-any-return]
        if self._database_manager is not None:
            with self._lock:
                if self._standalone is None:
                    settings = Settings.from_mapping(DEFAULTS)
                    store = create_store(
                        None, settings, self._database_manager, self._redis_manager
                    )
                    if store.embedded:
                        store.setup(self._registry.types.values())
                    self._standalone = Runtime(None, settings, store, self._registry.types)
                    self._standalone.start_sweeper(self._registry)
                return self._standalone
        apps = list(self._apps)
        if len(apps) == 1:
            return apps[0].extensions[EXTENSION_KEY]  # type: ignore[no-any-return]
        raise ConfigurationError(
            "No application context: use `with app.app_context():`, or "
            + (
                "initialise an app with state_manager.init_app(app)."
                if not apps
                else "several apps are initialised, so say which one."
            )
        )

    def _close_standalone(self) -> None:
        if self._standalone is not None:
            self._standalone.close()
            self._standalone = None


def _register_endpoints(app: Flask, settings: Settings) -> None:
    """Add the health blueprint and the ``/metrics`` view, as configured, once per app."""
    from .health import health
    from .prometheus import add_metrics_view

    if settings.health_url_prefix and health.name not in app.blueprints:
        app.register_blueprint(health, url_prefix=settings.health_url_prefix)
    if settings.metrics_url:
        add_metrics_view(app, settings.metrics_url)
