"""The health blueprint against real stores, with real outages.

The outage tests start their own PostgreSQL cluster (``initdb`` + ``pg_ctl``
in a temporary directory) and their own ``redis-server``, stop them for real,
read the 503 / ``degraded`` answers, start them again and read ``healthy``.
The shared test servers are never stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from flask_statemanager import StateManager
from flask_statemanager.errors import ConfigurationError
from flask_statemanager.health import HEALTH_JSON, redact
from flask_statemanager.stores.sql import SQLStore

from .conftest import IN_CI, make_app
from .test_cache import RedisServer, _free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PASSWORD = "s3cret-Pw-7781"


def user(**data: Any) -> dict[str, Any]:
    return {"type": "user", "data": data}


def _app(tmp_path: Path, **config: Any) -> Flask:
    app = make_app(tmp_path, **config)
    manager = StateManager()
    manager.register_type("user")
    manager.init_app(app)
    return app


def _get(client: FlaskClient, url: str, **headers: str) -> TestResponse:
    return client.get(url, headers=headers)


def _no_secrets(response: TestResponse, *secrets: str) -> None:
    text = response.get_data(as_text=True)
    for secret in (PASSWORD, "127.0.0.1", "://", *secrets):
        assert secret not in text, f"{secret!r} leaked into {text}"


# -- a private PostgreSQL cluster ---------------------------------------------------------------


class PostgresServer:
    """A PostgreSQL cluster of our own in a temporary directory, on a free port."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            message = f"no PostgreSQL binaries in {PG_BIN}; the outage tests start their own."
            if IN_CI:
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        # Not under pytest's tmp_path: the postgres user must be able to reach it.
        self.directory = Path(tempfile.mkdtemp(prefix="sm-health-pg-"))
        self.directory.chmod(0o755)
        self.data = self.directory / "data"
        self.port = _free_port()
        self._run("initdb", "-D", str(self.data), "--no-locale", "-E", "UTF8", "--auth=trust")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(PG_BIN / tool), *args]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(self.directory, "postgres", "postgres")
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.directory / "log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def url(self, user: str = "postgres", password: str | None = None) -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/postgres"

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    engine = sa.create_engine(server.url().replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        # Trust authentication accepts the password, but it is in the URL all along.
        conn.execute(sa.text(f"CREATE ROLE app LOGIN SUPERUSER PASSWORD '{PASSWORD}'"))
        conn.commit()
    engine.dispose()
    yield server
    server.remove()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    yield server
    if server.process is not None:
        server.kill()


def _wait_for(client: FlaskClient, url: str, status: str, timeout: float = 10) -> TestResponse:
    deadline = time.monotonic() + timeout
    while True:
        response = _get(client, url)
        if response.get_json()["status"] == status or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


# -- the endpoints ------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis"])
def store_app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Flask]:
    config: dict[str, Any] = {
        "memory": {"STATEMANAGER_STORE": "memory"},
        "sqlite": {},
        "postgres": {"STATEMANAGER_DATABASE_URI": "postgres"},
        "redis": {"STATEMANAGER_STORE": "redis", "STATEMANAGER_REDIS_URL": "redis"},
    }[request.param]
    if request.param == "postgres":
        config["STATEMANAGER_DATABASE_URI"] = request.getfixturevalue("postgres_url")
    if request.param == "redis":
        config["STATEMANAGER_REDIS_URL"] = request.getfixturevalue("clean_redis")
    app = _app(tmp_path, **config)
    with app.app_context():
        StateManager().create_all()
        StateManager().store.reset()
    yield app


def test_health_report_on_every_store(store_app: Flask) -> None:
    with store_app.app_context():
        sm = StateManager()
        sm.register_state("u1", "user", user())
        sm.register_state("u2", "user", user())
        sm.delete_state("u2")
    client = store_app.test_client()
    response = _get(client, "/health")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_json()
    assert body["status"] == "healthy"
    assert body["state_count"] == 1 and body["state_count_exact"] is True
    assert body["cache_hit_rate"] is None
    database = body["checks"]["database"]
    assert database["status"] == "up"
    assert database["latency_ms"] >= 0
    assert database["time"].endswith("Z")
    assert database["component"] in ("memory", "sqlite", "postgresql", "redis")

    live = _get(client, "/health/live")
    assert (live.status_code, live.get_json()["status"]) == (200, "healthy")
    ready = _get(client, "/health/ready")
    assert ready.status_code == 200
    assert ready.get_json()["checks"]["database"]["status"] == "up"


def test_health_json_media_type_when_asked(tmp_path: Path) -> None:
    app = _app(tmp_path, STATEMANAGER_STORE="memory")
    with app.app_context():
        StateManager().register_state("u1", "user", user())
    client = app.test_client()
    response = _get(client, "/health", Accept=HEALTH_JSON)
    assert response.status_code == 200
    assert response.mimetype == HEALTH_JSON
    body = json.loads(response.get_data())
    assert body["status"] == "pass"
    (check,) = body["checks"]["database:responseTime"]
    assert check["status"] == "pass" and check["observedUnit"] == "ms"
    assert check["observedValue"] >= 0 and check["time"].endswith("Z")
    assert body["checks"]["states:count"][0]["observedValue"] == 1
    # Preferring plain JSON, or not saying, gets plain JSON.
    for accept in ("application/json, application/health+json;q=0.5", "*/*"):
        assert _get(client, "/health", Accept=accept).mimetype == "application/json"
    assert _get(client, "/health/live", Accept=HEALTH_JSON).get_json()["status"] == "pass"


@pytest.mark.parametrize("off", [None, ""])
def test_blueprint_can_be_turned_off(tmp_path: Path, off: str | None) -> None:
    app = _app(tmp_path, STATEMANAGER_STORE="memory", STATEMANAGER_HEALTH_URL_PREFIX=off)
    client = app.test_client()
    assert _get(client, "/health").status_code == 404
    assert _get(client, "/health/ready").status_code == 404


def test_blueprint_under_another_prefix_and_reinit(tmp_path: Path) -> None:
    app = _app(tmp_path, STATEMANAGER_STORE="memory", STATEMANAGER_HEALTH_URL_PREFIX="/ops/hc/")
    StateManager().init_app(app)  # a second init_app registers nothing twice
    client = app.test_client()
    assert _get(client, "/ops/hc").get_json()["status"] == "healthy"
    assert _get(client, "/ops/hc/live").status_code == 200
    assert _get(client, "/health").status_code == 404


@pytest.mark.parametrize("bad", ["health", "/", 42])
def test_bad_prefix_is_a_configuration_error(tmp_path: Path, bad: Any) -> None:
    app = make_app(tmp_path, STATEMANAGER_STORE="memory", STATEMANAGER_HEALTH_URL_PREFIX=bad)
    with pytest.raises(ConfigurationError, match="STATEMANAGER_HEALTH_URL_PREFIX"):
        StateManager().init_app(app)


def test_redact_masks_urls_credentials_and_known_secrets() -> None:
    body = {
        "error": "could not connect to postgresql://app:pw1@db.internal:5432/prod",
        "list": ["app:pw2@db.internal", "host=db password=pw3 user=app", "token XYZ-secret"],
    }
    text = json.dumps(redact(body, ["XYZ-secret"]))
    for leaked in ("pw1", "pw2", "pw3", "db.internal", "XYZ-secret", "://"):
        assert leaked not in text
    assert redact({"n": 1, "ok": None}) == {"n": 1, "ok": None}


def test_redact_masks_names_in_messages_only_as_whole_words() -> None:
    body = {
        "error": 'role "admin" does not exist; user postgres at db-eu; Error connecting to '
        "redis:6379",
        "component": "redis",
        "quoted": "failed to resolve host 'svc' for database \"other\" as user 'x'",
    }
    out = redact(body, names=["admin", "postgres", "redis", "db"])
    assert out == {
        "error": 'role "***" does not exist; user *** at db-eu; Error connecting to ***:6379',
        "component": "redis",  # one-word values are the report's own vocabulary
        "quoted": "failed to resolve host '***' for database \"***\" as user '***'",
    }


def _unreachable(postgres_url: str, case: str) -> tuple[dict[str, Any], list[str], str]:
    """Store config whose connection fails with a driver message naming a host, role
    or database: (config, the names that must not leak, what the message must still say)."""
    server = urlsplit(postgres_url)
    at = f"{server.hostname}:{server.port}"
    return {
        "host": (
            {"STATEMANAGER_DATABASE_URI": f"postgresql://admin:{PASSWORD}@dbprimary:5432/proddb"},
            ["dbprimary", "admin", "proddb"],
            "failed to resolve host",
        ),
        "role": (
            {"STATEMANAGER_DATABASE_URI": f"postgresql://admin_nobody:{PASSWORD}@{at}/proddb"},
            ["admin_nobody", "proddb"],
            "does not exist",
        ),
        "database": (
            {"STATEMANAGER_DATABASE_URI": f"postgresql://{server.username}@{at}/nosuchdb_hc"},
            ["nosuchdb_hc"],
            "does not exist",
        ),
        "redis host": (
            {
                "STATEMANAGER_STORE": "redis",
                "STATEMANAGER_REDIS_URL": f"redis://cacheuser:{PASSWORD}@cachehost:6379/0",
            },
            ["cachehost", "cacheuser"],
            "Redis is unavailable",
        ),
    }[case]


@pytest.mark.parametrize("case", ["host", "role", "database", "redis host"])
def test_unreachable_store_names_no_host_role_or_database(
    tmp_path: Path, postgres_url: str, case: str
) -> None:
    config, names, says = _unreachable(postgres_url, case)
    app = _app(tmp_path, STATEMANAGER_CONNECT_TIMEOUT=2, **config)
    client = app.test_client()
    for path, accept in [
        ("/health", "application/json"),
        ("/health", HEALTH_JSON),
        ("/health/ready", "application/json"),
        ("/health/ready", HEALTH_JSON),
    ]:
        response = _get(client, path, Accept=accept)
        assert response.status_code == 503
        assert says in response.get_data(as_text=True)
        _no_secrets(response, *names)
    with app.app_context():
        error = StateManager().get_health_status()["checks"]["database"]["error"]
    assert says in error and not any(name in error for name in names), error


def test_missing_tables_are_unhealthy_and_not_ready(tmp_path: Path, postgres_url: str) -> None:
    app = _app(
        tmp_path, STATEMANAGER_DATABASE_URI=postgres_url, STATEMANAGER_TABLE_PREFIX="sm_absent_"
    )
    client = app.test_client()  # `flask states init-db` never ran
    for url in ("/health", "/health/ready"):
        response = _get(client, url)
        assert response.status_code == 503
        check = response.get_json()["checks"]["database"]
        assert check["status"] == "down"
        assert "sm_absent_states" in check["error"] and "does not exist" in check["error"]


# -- the state count --------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["statemanager_", "Mixed_Case_"])
def test_postgres_state_count_is_the_planner_estimate_once_large(
    tmp_path: Path, postgres_url: str, prefix: str
) -> None:
    app = _app(tmp_path, STATEMANAGER_DATABASE_URI=postgres_url, STATEMANAGER_TABLE_PREFIX=prefix)
    with app.app_context():
        sm = StateManager()
        sm.create_all()
        sm.store.reset()
        store = sm.store
        assert isinstance(store, SQLStore)
        for i in range(40):
            sm.register_state(f"u{i}", "user", user(n=i))
        for i in range(10):
            sm.delete_state(f"u{i}")
        client = app.test_client()
        # Below the threshold the count is exact, whatever the statistics say.
        body = _get(client, "/health").get_json()
        assert (body["state_count"], body["state_count_exact"]) == (30, True)
        autocommit = store.engine.execution_options(isolation_level="AUTOCOMMIT")
        with autocommit.connect() as conn:
            quoted = store.engine.dialect.identifier_preparer.format_table(store.states)
            conn.execute(sa.text(f"ANALYZE {quoted}"))
        store.EXACT_COUNT_BELOW = 5  # as if 40 rows were millions
        body = _get(client, "/health").get_json()
        # The planner's estimate of live rows: the deleted ones are left out.
        assert body["state_count_exact"] is False
        assert 25 <= body["state_count"] <= 35
        assert _get(client, "/health", Accept=HEALTH_JSON).get_json()["checks"]["states:count"][0][
            "observedUnit"
        ] == ("states (estimate)")


def test_postgres_table_never_analysed_is_counted_exactly(
    tmp_path: Path, postgres_url: str
) -> None:
    app = _app(
        tmp_path, STATEMANAGER_DATABASE_URI=postgres_url, STATEMANAGER_TABLE_PREFIX="sm_fresh_"
    )
    with app.app_context():
        sm = StateManager()
        store = sm.store
        assert isinstance(store, SQLStore)
        with store.engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS sm_fresh_history, sm_fresh_states"))
        sm.create_all()
        sm.register_state("u1", "user", user())
        store.EXACT_COUNT_BELOW = 0
        assert store.estimate_count() == (1, True)  # reltuples is -1 until ANALYZE


def test_sqlite_slow_count_is_reused_for_a_few_seconds(tmp_path: Path) -> None:
    app = _app(tmp_path)
    with app.app_context():
        sm = StateManager()
        store = sm.store
        assert isinstance(store, SQLStore)
        store.SLOW_COUNT_SECONDS = 0.0  # every count is "slow" here
        store.COUNT_CACHE_SECONDS = 0.3
        sm.register_state("u1", "user", user())
        assert store.estimate_count() == (1, True)
        sm.register_state("u2", "user", user())
        assert store.estimate_count() == (1, False)  # the cached count, marked inexact
        time.sleep(0.35)
        assert store.estimate_count() == (2, True)


# -- outages, for real ---------------------------------------------------------------------------


def test_postgres_down_gives_503_then_healthy_again(
    tmp_path: Path, private_postgres: PostgresServer
) -> None:
    url = private_postgres.url("app", PASSWORD)
    app = _app(
        tmp_path,
        STATEMANAGER_DATABASE_URI=url,
        STATEMANAGER_ENGINE_OPTIONS={"connect_args": {"connect_timeout": 2}},
    )
    with app.app_context():
        StateManager().create_all()
        StateManager().store.reset()
        StateManager().register_state("u1", "user", user())
    client = app.test_client()
    up = _get(client, "/health")
    assert up.status_code == 200 and up.get_json()["status"] == "healthy"
    assert up.get_json()["state_count"] == 1
    _no_secrets(up)

    private_postgres.stop()
    try:
        down = _get(client, "/health")
        assert down.status_code == 503
        body = down.get_json()
        assert body["status"] == "unhealthy"
        assert body["state_count"] is None
        assert body["checks"]["database"]["status"] == "down"
        assert body["checks"]["database"]["component"] == "postgresql"  # as when up
        assert body["checks"]["database"]["error"]
        _no_secrets(down, str(private_postgres.port))
        draft = _get(client, "/health", Accept=HEALTH_JSON)
        assert draft.status_code == 503 and draft.get_json()["status"] == "fail"
        _no_secrets(draft, str(private_postgres.port))
        ready = _get(client, "/health/ready")
        assert ready.status_code == 503 and ready.get_json()["status"] == "unhealthy"
        _no_secrets(ready, str(private_postgres.port))
        assert _get(client, "/health/live").status_code == 200  # never asks the database
        with app.app_context():
            report = json.dumps(StateManager().get_health_status())
        for secret in (PASSWORD, "127.0.0.1", str(private_postgres.port), "://"):
            assert secret not in report
    finally:
        private_postgres.start()

    again = _wait_for(client, "/health", "healthy")
    assert again.status_code == 200 and again.get_json()["state_count"] == 1
    assert _get(client, "/health/ready").status_code == 200


def test_cache_down_is_degraded_not_unhealthy(
    tmp_path: Path, private_postgres: PostgresServer, redis_server: RedisServer
) -> None:
    app = _app(
        tmp_path,
        STATEMANAGER_DATABASE_URI=private_postgres.url("app", PASSWORD),
        STATEMANAGER_REDIS_URL=redis_server.url,
        STATEMANAGER_CACHE_TIMEOUT=0.2,
        STATEMANAGER_CACHE_COOLDOWN=0.1,
    )
    with app.app_context():
        sm = StateManager()
        sm.create_all()
        sm.store.reset()
        sm.register_state("u1", "user", user())
        sm.get_state("u1")
        sm.get_state("u1")
    client = app.test_client()
    body = _get(client, "/health").get_json()
    assert body["status"] == "healthy"
    assert body["checks"]["redis"]["status"] == "up"
    assert 0 < body["cache_hit_rate"] <= 1

    redis_server.kill()
    degraded = _get(client, "/health")
    assert degraded.status_code == 200
    body = degraded.get_json()
    assert body["status"] == "degraded"
    assert body["checks"]["database"]["status"] == "up"
    assert body["checks"]["redis"]["status"] == "down" and body["checks"]["redis"]["error"]
    assert body["state_count"] == 1
    _no_secrets(degraded, str(redis_server.port), str(private_postgres.port))
    draft = _get(client, "/health", Accept=HEALTH_JSON).get_json()
    assert draft["status"] == "warn"
    assert draft["checks"]["redis:responseTime"][0]["status"] == "fail"
    assert _get(client, "/health/ready").status_code == 200  # the database answers

    redis_server.start()
    again = _wait_for(client, "/health", "healthy")
    assert again.get_json()["checks"]["redis"]["status"] == "up"


def test_redis_store_down_gives_503_then_healthy_again(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    app = _app(tmp_path, STATEMANAGER_STORE="redis", STATEMANAGER_REDIS_URL=redis_server.url)
    with app.app_context():
        StateManager().register_state("u1", "user", user())
    client = app.test_client()
    assert _get(client, "/health").get_json()["status"] == "healthy"

    redis_server.kill()
    down = _get(client, "/health")
    assert down.status_code == 503
    assert down.get_json()["status"] == "unhealthy"
    assert down.get_json()["checks"]["database"]["component"] == "redis"
    _no_secrets(down, str(redis_server.port))
    assert _get(client, "/health/ready").status_code == 503

    redis_server.start()  # from its append-only file: the state is still there
    again = _wait_for(client, "/health", "healthy")
    assert again.status_code == 200 and again.get_json()["state_count"] == 1
