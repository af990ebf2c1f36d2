"""Core benchmarks: flask-statemanager against hand-written baselines.

Every figure is a ratio ``ours / baseline`` of operations per second, both
measured in the same run, on the same database, on the same tables and rows.
The baselines are the plain driver doing the same database work (psycopg 3 for
PostgreSQL, the stdlib ``sqlite3`` module for SQLite) with the same statements
and indexes the extension's SQL store uses; see ``benchmarks/README.md``.

Usage::

    bash scripts/servers start && eval "$(bash scripts/servers env)"
    .venv/bin/python benchmarks/bench_core.py            # full run (~3-5 minutes)
    .venv/bin/python benchmarks/bench_core.py --quick    # smoke run (~30 seconds)

The exit code is 0 whatever the figures are: this is a report, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from flask import Flask

import flask_statemanager
from flask_statemanager import StateManager
from flask_statemanager.audit import chain_hash
from flask_statemanager.records import STATE_COLUMNS

# -- parameters -----------------------------------------------------------------

#: Ten values of ``data.status``, spread evenly: one state in ten is "active".
STATUSES = (
    "active",
    "inactive",
    "trial",
    "paying",
    "suspended",
    "churned",
    "vip",
    "blocked",
    "archived",
    "invited",
)
TYPE = "user"
#: States written through the API before the bulk load; their rows are the model.
API_SEEDED = 10
PER_PAGE = 50
SEARCH_STATUS = "active"
PG_DEFAULT_URL = "postgresql://postgres@127.0.0.1:54329/statemanager_test"
BENCH_DATABASE = "statemanager_bench"

_SELECT_COLUMNS = ", ".join(f"statemanager_states.{c}" for c in STATE_COLUMNS)


@dataclass(frozen=True)
class Profile:
    """How much work one run does."""

    name: str
    rows: int  # states in the table (the search figures need 100k)
    rounds: int  # alternating ours/baseline rounds per figure; the median is kept
    round_seconds: float  # target duration of one side's round
    warmup_seconds: float  # per side, also used to size the rounds
    update_pool: int  # states the update figures cycle through


FULL = Profile(
    "full", rows=100_000, rounds=7, round_seconds=1.0, warmup_seconds=0.6, update_pool=2_000
)
QUICK = Profile(
    "quick", rows=5_000, rounds=3, round_seconds=0.15, warmup_seconds=0.1, update_pool=200
)


def state_id(i: int) -> str:
    return f"user-{i:06d}"


def data_for(i: int, rev: int = 0) -> dict[str, Any]:
    """The data of state *i*: its status never changes, so search results stay put."""
    data: dict[str, Any] = {"status": STATUSES[i % len(STATUSES)], "n": i}
    if rev:
        data["rev"] = rev
    return data


def sqlite_ts(value: datetime) -> str:
    """A UTC datetime as SQLAlchemy stores it in SQLite (naive UTC text)."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def sqlite_dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def normalize_sql(sql: str) -> str:
    """Whitespace, placeholder style and timestamps folded, to compare two SQL texts."""
    sql = re.sub(r"%\(\w+\)s", "%s", sql)
    # sqlite3 traces show values inline; the "now" of a search differs between calls.
    sql = re.sub(r"'\d{4}-\d\d-\d\d[ T][\d:.+-]+'", "<timestamp>", sql)
    return re.sub(r"\s+", " ", sql).strip()


# -- measuring ------------------------------------------------------------------


@dataclass
class Side:
    """One contender: ``op(i)`` does operation number *i*; ``before_round`` is untimed."""

    op: Callable[[int], Any]
    before_round: Callable[[], None] = lambda: None
    rates: list[float] = field(default_factory=list)
    per_round: int = 0


@dataclass
class Result:
    figure: str
    goal: float
    ours: float = 0.0
    baseline: float = 0.0
    note: str = ""
    skipped: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else 0.0

    @property
    def passed(self) -> bool:
        return not self.skipped and self.ratio >= self.goal


class Counter:
    """Operation numbers shared by both sides, so they walk the same states."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> range:
        start = self.next
        self.next += n
        return range(start, start + n)


def _timed(side: Side, ops: range) -> float:
    side.before_round()
    op = side.op
    start = time.perf_counter()
    for i in ops:
        op(i)
    return time.perf_counter() - start


def _calibrate(side: Side, counter: Counter, profile: Profile) -> None:
    """Warm up for ``warmup_seconds`` and size a round to ``round_seconds``."""
    done, spent = 0, 0.0
    batch = 1
    while spent < profile.warmup_seconds or done < 3:
        spent += _timed(side, counter.take(batch))
        done += batch
        batch = min(batch * 2, 256)
    per_op = spent / done
    side.per_round = max(5, round(profile.round_seconds / per_op))


def compare(result: Result, ours: Side, baseline: Side, profile: Profile) -> Result:
    """Alternate ours and the baseline for ``profile.rounds`` rounds; keep the medians."""
    counter = Counter()
    # Warm up both before timing either.
    _calibrate(ours, counter, profile)
    _calibrate(baseline, counter, profile)
    for r in range(profile.rounds):
        order = (ours, baseline) if r % 2 == 0 else (baseline, ours)
        for side in order:
            ops = counter.take(side.per_round)
            side.rates.append(len(ops) / _timed(side, ops))
    result.ours = statistics.median(ours.rates)
    result.baseline = statistics.median(baseline.rates)
    spread = [o / b for o, b in zip(ours.rates, baseline.rates, strict=True)]
    result.note = (result.note + "; " if result.note else "") + (
        f"per-round ratio {min(spread):.2f}..{max(spread):.2f}, "
        f"{ours.per_round}/{baseline.per_round} ops per round"
    )
    print(
        f"  {result.figure:<34} ours {result.ours:>9.1f}/s  baseline "
        f"{result.baseline:>9.1f}/s  ratio {result.ratio:.3f}  ({result.note})",
        flush=True,
    )
    return result


# -- the extension --------------------------------------------------------------


@contextmanager
def extension(url: str, instance_path: str) -> Iterator[tuple[Flask, StateManager]]:
    """A fresh app with the extension on *url*, inside an app context."""
    StateManager.reset_instance()
    app = Flask("bench", instance_path=instance_path)
    app.config["STATEMANAGER_DATABASE_URI"] = url
    sm = StateManager()
    sm.register_type(TYPE, indexes=["data.status"])
    sm.init_app(app)
    with app.app_context():
        sm.create_all()
        sm.store.reset()
        try:
            yield app, sm
        finally:
            StateManager.reset_instance()


def seed_through_api(sm: StateManager) -> None:
    for i in range(API_SEEDED):
        sm.register_state(state_id(i), TYPE, {"data": data_for(i)})


_STATEMENT_RE = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\b", re.IGNORECASE)


def _record(dbapi_conn: Any, seen: list[str] | None, saved: dict[int, Any]) -> None:
    """Start (or, with ``seen=None``, stop) recording what one DB-API connection runs.

    sqlite3 has a trace callback (it gets the SQL with the values filled in);
    psycopg gets a cursor class that notes each query before running it.
    """
    if isinstance(dbapi_conn, sqlite3.Connection):
        dbapi_conn.set_trace_callback(None if seen is None else seen.append)
        return
    if seen is None:
        dbapi_conn.cursor_factory = saved.pop(id(dbapi_conn), dbapi_conn.cursor_factory)
        return
    base = saved.setdefault(id(dbapi_conn), dbapi_conn.cursor_factory)

    class Recording(base):  # type: ignore[misc, valid-type]
        def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            seen.append(query.decode() if isinstance(query, bytes) else str(query))
            return super().execute(query, *args, **kwargs)

    dbapi_conn.cursor_factory = Recording


@contextmanager
def captured_sql(engine: sa.Engine) -> Iterator[list[str]]:
    """The statements the store sends to the driver inside the block.

    Recorded at the driver, on every connection checked out of the store's pool,
    so SQL the store runs on the raw DB-API connection is seen as well as SQL
    run through SQLAlchemy. Transaction control (BEGIN, COMMIT, ...) is left out.
    """
    seen: list[str] = []
    touched: list[Any] = []
    saved: dict[int, Any] = {}

    def on_checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        touched.append(dbapi_conn)
        _record(dbapi_conn, seen, saved)

    sa.event.listen(engine, "checkout", on_checkout)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "checkout", on_checkout)
        for dbapi_conn in touched:
            _record(dbapi_conn, None, saved)
        seen[:] = [s for s in seen if _STATEMENT_RE.match(s)]


@contextmanager
def traced_sqlite(conn: sqlite3.Connection) -> Iterator[list[str]]:
    """What the baseline's sqlite3 connection runs, recorded like the store's."""
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        yield seen
    finally:
        conn.set_trace_callback(None)
        seen[:] = [s for s in seen if _STATEMENT_RE.match(s)]


def check_same_sql(label: str, ours: list[str], baseline: list[str], *, strict: bool = True) -> str:
    """Compare the store's statements with the baseline's.

    With *strict*, the baseline must mirror the store (searches): a difference is
    a loud warning. Otherwise the baseline is defined on its own (the plain
    ``SELECT`` of ``get_state``) and the store's SQL is just shown.
    """
    if [normalize_sql(s) for s in ours] == [normalize_sql(s) for s in baseline]:
        return "same SQL as the store"
    if not strict:
        for s in ours:
            print(f"  {label}: the store sends: {normalize_sql(s)}")
        return "baseline: plain SELECT by primary key"
    print(f"  WARNING: {label}: the baseline SQL differs from the store's:", file=sys.stderr)
    for s in ours:
        print(f"    store:    {normalize_sql(s)}", file=sys.stderr)
    for s in baseline:
        print(f"    baseline: {normalize_sql(s)}", file=sys.stderr)
    return "SQL DIFFERS from the store (see stderr)"


def mask(state: dict[str, Any], change: dict[str, Any], i: int) -> tuple[dict, dict]:
    """Rows of state *i* with what differs from state to state checked and blanked."""
    if state["data"] != change["new_data"] or state["state_id"] != state_id(i):
        raise SystemExit(f"unexpected rows for {state_id(i)}: {state} {change}")
    state["data"] = change["new_data"] = state["state_id"] = change["state_id"] = "<i>"
    state["name"] = "<i>" if state["name"] == state_id(i) else state["name"]
    return state, change


def shape_check(model: dict[str, Any], made: dict[str, Any], what: str) -> None:
    """The bulk-loaded rows must look exactly like the API-written ones.

    Values that differ by nature (timestamps, ids) must at least have the same
    type, and the same length when they are text (SQLite stores timestamps as text).
    """

    def kind(value: Any) -> Any:
        return (type(value), len(value) if isinstance(value, str) else None)

    ignore = {"created_at", "updated_at", "change_id", "id", "hash"}
    a = {k: v if k not in ignore else kind(v) for k, v in model.items()}
    b = {k: v if k not in ignore else kind(v) for k, v in made.items()}
    if a != b:
        raise SystemExit(f"bulk {what} row shape differs from the API's:\n  api:  {a}\n  bulk: {b}")


def create_hash(change_id: str, sid: str, data: dict[str, Any], now: datetime) -> str:
    """The hash the engine seals a state's first history entry with (audit.chain_hash)."""
    change = {
        "change_id": change_id,
        "state_id": sid,
        "version": 1,
        "transition": "create",
        "old_data": None,
        "new_data": data,
        "actor": None,
        "metadata": {"from_status": None, "to_status": "pending"},
        "created_at": now,
    }
    return chain_hash(None, change)


def history_meta() -> dict[str, Any]:
    return {"from_status": "pending", "to_status": "pending"}


# -- PostgreSQL -----------------------------------------------------------------

PG_GET = f"SELECT {', '.join(STATE_COLUMNS)} FROM statemanager_states WHERE state_id = %s"
PG_UPDATE = (
    "UPDATE statemanager_states SET data = %s, version = version + 1, updated_at = %s "
    "WHERE state_id = %s AND version = %s"
)
PG_INSERT_CHANGE = (
    "INSERT INTO statemanager_history (change_id, state_id, version, transition, old_data, "
    "new_data, actor, metadata, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_PG_WHERE = (
    "WHERE statemanager_states.type = %s::VARCHAR "
    "AND (statemanager_states.status NOT IN (%s::VARCHAR, %s::VARCHAR)) "
    "AND (statemanager_states.expires_at IS NULL "
    "OR statemanager_states.expires_at > %s::TIMESTAMP WITH TIME ZONE) "
    "AND (data #> '{\"status\"}') = %s::JSONB"
)
PG_SEARCH = (
    f"SELECT {_SELECT_COLUMNS} FROM statemanager_states {_PG_WHERE} "
    "ORDER BY statemanager_states.state_id ASC "
    "LIMIT %s::INTEGER OFFSET %s::INTEGER"
)
PG_COUNT = f"SELECT count(*) AS count_1 FROM statemanager_states {_PG_WHERE}"


def pg_bench_url(given: str | None) -> str:
    """The benchmark's own database on the test server (the test suite resets its own)."""
    if given:
        return given
    base = sa.make_url(os.environ.get("STATEMANAGER_TEST_POSTGRES_URL") or PG_DEFAULT_URL)
    return base.set(database=BENCH_DATABASE).render_as_string(hide_password=False)


def pg_ensure_database(url: str) -> None:
    import psycopg

    parsed = sa.make_url(url)
    admin = parsed.set(drivername="postgresql", database="postgres")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as c:
        found = c.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (parsed.database,)
        ).fetchone()
        if not found:
            c.execute(f'CREATE DATABASE "{parsed.database}"')


def pg_load(conn: Any, rows: int) -> None:
    """COPY states ``API_SEEDED..rows`` (and their create entries) shaped like the API's."""
    from psycopg.types.json import Jsonb

    now = datetime.now(UTC)
    meta, create_meta = (
        Jsonb({"version": "1.0"}),
        Jsonb({"from_status": None, "to_status": "pending"}),
    )
    with conn.cursor() as cur:
        with cur.copy(
            "COPY statemanager_states (state_id, name, type, status, data, metadata, version, "
            "created_at, updated_at, expires_at) FROM STDIN"
        ) as copy:
            for i in range(API_SEEDED, rows):
                sid, data = state_id(i), Jsonb(data_for(i))
                copy.write_row((sid, sid, TYPE, "pending", data, meta, 1, now, now, None))
        with cur.copy(
            "COPY statemanager_history (change_id, state_id, version, transition, old_data, "
            "new_data, actor, metadata, created_at, hash) FROM STDIN"
        ) as copy:
            for i in range(API_SEEDED, rows):
                sid, data, change_id = state_id(i), Jsonb(data_for(i)), uuid.uuid4().hex
                seal = create_hash(change_id, sid, data_for(i), now)
                copy.write_row(
                    (change_id, sid, 1, "create", None, data, None, create_meta, now, seal)
                )
    conn.commit()


def pg_row_model(conn: Any, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    cur = conn.execute(
        f"SELECT {', '.join(STATE_COLUMNS)} FROM statemanager_states WHERE state_id = %s",
        (state_id(i),),
    )
    state = dict(zip(STATE_COLUMNS, cur.fetchone(), strict=True))
    cur = conn.execute("SELECT * FROM statemanager_history WHERE state_id = %s", (state_id(i),))
    change = dict(zip([d.name for d in cur.description], cur.fetchone(), strict=True))
    conn.rollback()
    return mask(state, change, i)


def pg_plan(conn: Any, now: datetime) -> str:
    from psycopg.types.json import Jsonb

    rows = conn.execute(
        "EXPLAIN " + PG_SEARCH, (TYPE, "deleted", "expired", now, Jsonb(SEARCH_STATUS), PER_PAGE, 0)
    ).fetchall()
    text = " | ".join(r[0].strip() for r in rows)
    used = "ix_statemanager_states_data_status" in text
    return "plan uses the declared index" if used else f"plan: {text}"


def run_postgres(profile: Profile, url: str, tmp: str) -> list[Result]:
    import psycopg

    goals = {
        "update_state / PostgreSQL": 0.6,
        "get_state / PostgreSQL": 0.7,
        f"search_states / PostgreSQL {profile.rows // 1000}k": 0.7,
    }
    try:
        pg_ensure_database(url)
        psycopg.connect(url, connect_timeout=5).close()
    except Exception as exc:  # noqa: BLE001 - any failure means: no PostgreSQL here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"PostgreSQL: SKIPPED ({reason})")
        return [Result(f, g, skipped="no PostgreSQL") for f, g in goals.items()]

    print(f"PostgreSQL: {sa.make_url(url).render_as_string(hide_password=True)}")
    results: list[Result] = []
    setup = psycopg.connect(url, autocommit=True)
    setup.execute("DROP TABLE IF EXISTS statemanager_history, statemanager_states")
    server = setup.execute("SHOW server_version").fetchone()[0]
    fsync = setup.execute("SHOW fsync").fetchone()[0]
    sync_commit = setup.execute("SHOW synchronous_commit").fetchone()[0]
    print(f"  server {server}, fsync={fsync}, synchronous_commit={sync_commit}")

    with extension(url, tmp) as (_app, sm):
        engine: sa.Engine = sm.store.engine
        writer = psycopg.connect(url)  # transactions, like the store
        reader = psycopg.connect(url, autocommit=True)  # one statement per read
        searcher = psycopg.connect(url, autocommit=True)
        searcher.prepare_threshold = None  # the store plans every search afresh too
        try:
            # Load: a few states through the API, the rest by COPY in the same shape.
            t0 = time.perf_counter()
            seed_through_api(sm)
            pg_load(writer, profile.rows)
            api_state, api_change = pg_row_model(writer, 0)
            made_state, made_change = pg_row_model(writer, API_SEEDED)
            shape_check(api_state, made_state, "state")
            shape_check(api_change, made_change, "history")
            setup.execute("VACUUM ANALYZE statemanager_states")
            setup.execute("VACUUM ANALYZE statemanager_history")
            print(
                f"  loaded {profile.rows} states (+ history) in "
                f"{time.perf_counter() - t0:.1f}s; bulk rows match the API's shape"
            )

            results.append(pg_update(profile, sm, engine, writer, goals))
            results.append(pg_get(profile, sm, engine, reader, goals))
            results.append(pg_search(profile, sm, engine, searcher, goals))
        finally:
            for c in (writer, reader, searcher):
                c.close()
    setup.close()
    return results


def pg_versions(conn: Any, pool: list[str]) -> dict[str, tuple[int, dict[str, Any]]]:
    """The stored version and data of each state in *pool* (what a baseline writes on)."""
    rows = conn.execute(
        "SELECT state_id, version, data FROM statemanager_states WHERE state_id = ANY(%s)",
        (pool,),
    ).fetchall()
    conn.commit()
    return {sid: (version, data) for sid, version, data in rows}


def pg_update(
    profile: Profile, sm: StateManager, engine: sa.Engine, conn: Any, goals: dict[str, float]
) -> Result:
    from psycopg.types.json import Jsonb

    figure = "update_state / PostgreSQL"
    pool = [state_id(i) for i in range(min(profile.update_pool, profile.rows))]
    known: dict[str, tuple[int, dict[str, Any]]] = {}

    def refresh() -> None:
        known.update(pg_versions(conn, pool))

    def base(i: int) -> None:
        sid = pool[i % len(pool)]
        version, old = known[sid]
        new = data_for(i % len(pool), rev=i + 1)
        now = datetime.now(UTC)
        cur = conn.execute(PG_UPDATE, (Jsonb(new), now, sid, version))
        if cur.rowcount != 1:
            raise RuntimeError(f"baseline lost a compare-and-set on {sid}")
        change = (uuid.uuid4().hex, sid, version + 1, "update", Jsonb(old), Jsonb(new), None)
        conn.execute(PG_INSERT_CHANGE, (*change, Jsonb(history_meta()), now))
        conn.commit()
        known[sid] = (version + 1, new)

    def ours(i: int) -> None:
        sm.update_state(pool[i % len(pool)], {"data": data_for(i % len(pool), rev=i + 1)})

    return compare(Result(figure, goals[figure]), Side(ours), Side(base, refresh), profile)


def pg_get(
    profile: Profile, sm: StateManager, engine: sa.Engine, conn: Any, goals: dict[str, float]
) -> Result:
    figure = "get_state / PostgreSQL"
    step = 7919  # a prime: walks the whole table in a scattered order
    ids = [state_id((k * step) % profile.rows) for k in range(profile.rows)]

    def base(i: int) -> dict[str, Any] | None:
        row = conn.execute(PG_GET, (ids[i % len(ids)],)).fetchone()
        return None if row is None else dict(zip(STATE_COLUMNS, row, strict=True))

    def ours(i: int) -> Any:
        return sm.get_state(ids[i % len(ids)])

    with captured_sql(engine) as sent:
        mine = ours(1)
    same = check_same_sql(figure, sent, [PG_GET], strict=False)
    theirs = base(1)
    if mine is None or theirs is None or {k: mine[k] for k in STATE_COLUMNS} != theirs:
        raise SystemExit(f"{figure}: the baseline returns a different record")
    return compare(Result(figure, goals[figure], note=same), Side(ours), Side(base), profile)


def pg_search(
    profile: Profile, sm: StateManager, engine: sa.Engine, conn: Any, goals: dict[str, float]
) -> Result:
    from psycopg.types.json import Jsonb

    figure = f"search_states / PostgreSQL {profile.rows // 1000}k"

    def base(i: int) -> tuple[list[dict[str, Any]], int]:
        params = (TYPE, "deleted", "expired", datetime.now(UTC), Jsonb(SEARCH_STATUS))
        rows = conn.execute(PG_SEARCH, (*params, PER_PAGE, 0)).fetchall()
        items = [dict(zip(STATE_COLUMNS, r, strict=True)) for r in rows]
        total = len(items)
        if total == PER_PAGE:
            total = conn.execute(PG_COUNT, params).fetchone()[0]
        return items, total

    def ours(i: int) -> Any:
        return sm.search_states(
            TYPE, {"data.status": SEARCH_STATUS}, per_page=PER_PAGE, order_by="state_id"
        )

    with captured_sql(engine) as sent:
        page = ours(0)
    same = check_same_sql(figure, sent, [PG_SEARCH, PG_COUNT])
    items, total = base(0)
    if [s["state_id"] for s in page] != [s["state_id"] for s in items] or page.total != total:
        raise SystemExit(f"{figure}: the baseline finds different states")
    note = f"{same}; {pg_plan(conn, datetime.now(UTC))}; page of {PER_PAGE} of {total}"
    return compare(Result(figure, goals[figure], note=note), Side(ours), Side(base), profile)


# -- SQLite ---------------------------------------------------------------------

SQ_UPDATE = (
    "UPDATE statemanager_states SET data = ?, version = version + 1, updated_at = ? "
    "WHERE state_id = ? AND version = ?"
)
SQ_INSERT_CHANGE = (
    "INSERT INTO statemanager_history (change_id, state_id, version, transition, old_data, "
    "new_data, actor, metadata, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQ_WHERE = (
    "WHERE statemanager_states.type = ? AND (statemanager_states.status NOT IN (?, ?)) "
    "AND (statemanager_states.expires_at IS NULL OR statemanager_states.expires_at > ?) "
    "AND json_extract(data, '$.\"status\"') = ? AND json_type(data, '$.\"status\"') IN (?)"
)
SQ_SEARCH = (
    f"SELECT {_SELECT_COLUMNS} FROM statemanager_states {_SQ_WHERE} "
    "ORDER BY statemanager_states.state_id ASC "
    "LIMIT ? OFFSET ?"
)
SQ_COUNT = f"SELECT count(*) AS count_1 FROM statemanager_states {_SQ_WHERE}"


def dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def sqlite_connect(path: str, synchronous: str) -> sqlite3.Connection:
    """The stdlib driver, set up as the extension sets up its own engine."""
    conn = sqlite3.connect(path, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


def sqlite_load(conn: sqlite3.Connection, rows: int) -> None:
    stamp = datetime.now(UTC)
    now = sqlite_ts(stamp)
    version_meta = dumps({"version": "1.0"})
    create_meta = dumps({"from_status": None, "to_status": "pending"})
    states = []
    changes = []
    for i in range(API_SEEDED, rows):
        sid, data, change_id = state_id(i), dumps(data_for(i)), uuid.uuid4().hex
        seal = create_hash(change_id, sid, data_for(i), stamp)
        states.append((sid, sid, TYPE, "pending", data, version_meta, 1, now, now, None))
        changes.append((change_id, sid, 1, "create", None, data, None, create_meta, now, seal))
    with conn:
        conn.executemany(
            "INSERT INTO statemanager_states (state_id, name, type, status, data, metadata, "
            "version, created_at, updated_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            states,
        )
        conn.executemany(
            "INSERT INTO statemanager_history (change_id, state_id, version, transition, "
            "old_data, new_data, actor, metadata, created_at, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            changes,
        )


def sqlite_row_model(conn: sqlite3.Connection, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    cur = conn.execute(
        f"SELECT {', '.join(STATE_COLUMNS)} FROM statemanager_states WHERE state_id = ?",
        (state_id(i),),
    )
    state = dict(zip(STATE_COLUMNS, cur.fetchone(), strict=True))
    cur = conn.execute("SELECT * FROM statemanager_history WHERE state_id = ?", (state_id(i),))
    change = dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=True))
    # Stored JSON text must be byte-for-byte what the bulk load writes.
    for stored in (state["data"], change["new_data"]):
        if stored != dumps(data_for(i)):
            raise SystemExit(f"JSON text differs: stored {stored!r}, bulk {dumps(data_for(i))!r}")
    return mask(state, change, i)


def sqlite_record(row: tuple[Any, ...]) -> dict[str, Any]:
    record = dict(zip(STATE_COLUMNS, row, strict=True))
    record["data"] = json.loads(record["data"])
    record["metadata"] = json.loads(record["metadata"])
    for k in ("created_at", "updated_at", "expires_at"):
        record[k] = sqlite_dt(record[k])
    return record


def sqlite_plan(conn: sqlite3.Connection) -> str:
    now = sqlite_ts(datetime.now(UTC))
    rows = conn.execute(
        "EXPLAIN QUERY PLAN " + SQ_SEARCH,
        (TYPE, "deleted", "expired", now, SEARCH_STATUS, "text", PER_PAGE, 0),
    ).fetchall()
    text = " | ".join(r[-1] for r in rows)
    return f"plan: {text}"


def run_sqlite(profile: Profile, tmp: str) -> list[Result]:
    path = os.path.join(tmp, "bench.sqlite3")
    url = "sqlite:///" + path
    results: list[Result] = []
    print(f"SQLite {sqlite3.sqlite_version}: {path}")
    with extension(url, tmp) as (app, sm):
        engine: sa.Engine = sm.store.engine
        synchronous = app.config["STATEMANAGER_SQLITE_SYNCHRONOUS"]
        conn = sqlite_connect(path, synchronous)
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        print(f"  journal_mode={mode}, synchronous={synchronous} (the extension's setting)")
        try:
            t0 = time.perf_counter()
            seed_through_api(sm)
            sqlite_load(conn, profile.rows)
            api_state, api_change = sqlite_row_model(conn, 0)
            made_state, made_change = sqlite_row_model(conn, API_SEEDED)
            shape_check(api_state, made_state, "state")
            shape_check(api_change, made_change, "history")
            conn.execute("ANALYZE")
            conn.commit()
            print(
                f"  loaded {profile.rows} states (+ history) in "
                f"{time.perf_counter() - t0:.1f}s; bulk rows match the API's shape"
            )
            results.append(sqlite_update(profile, sm, conn))
            results.append(sqlite_search(profile, sm, engine, conn))
        finally:
            conn.close()
    return results


def sqlite_update(profile: Profile, sm: StateManager, conn: sqlite3.Connection) -> Result:
    figure = "update_state / SQLite"
    pool = [state_id(i) for i in range(min(profile.update_pool, profile.rows))]
    known: dict[str, tuple[int, str]] = {}
    meta = dumps(history_meta())

    def refresh() -> None:
        marks = ", ".join("?" * len(pool))
        rows = conn.execute(
            f"SELECT state_id, version, data FROM statemanager_states WHERE state_id IN ({marks})",
            pool,
        ).fetchall()
        known.update({sid: (version, data) for sid, version, data in rows})

    def base(i: int) -> None:
        sid = pool[i % len(pool)]
        version, old = known[sid]
        new = dumps(data_for(i % len(pool), rev=i + 1))
        now = sqlite_ts(datetime.now(UTC))
        cur = conn.execute(SQ_UPDATE, (new, now, sid, version))
        if cur.rowcount != 1:
            raise RuntimeError(f"baseline lost a compare-and-set on {sid}")
        conn.execute(
            SQ_INSERT_CHANGE,
            (uuid.uuid4().hex, sid, version + 1, "update", old, new, None, meta, now),
        )
        conn.commit()
        known[sid] = (version + 1, new)

    def ours(i: int) -> None:
        sm.update_state(pool[i % len(pool)], {"data": data_for(i % len(pool), rev=i + 1)})

    return compare(Result(figure, 0.5), Side(ours), Side(base, refresh), profile)


def sqlite_search(
    profile: Profile, sm: StateManager, engine: sa.Engine, conn: sqlite3.Connection
) -> Result:
    figure = f"search_states / SQLite {profile.rows // 1000}k"

    def base(i: int) -> tuple[list[dict[str, Any]], int]:
        params = (TYPE, "deleted", "expired", sqlite_ts(datetime.now(UTC)), SEARCH_STATUS, "text")
        rows = conn.execute(SQ_SEARCH, (*params, PER_PAGE, 0)).fetchall()
        items = [sqlite_record(r) for r in rows]
        total = len(items)
        if total == PER_PAGE:
            total = conn.execute(SQ_COUNT, params).fetchone()[0]
        return items, total

    def ours(i: int) -> Any:
        return sm.search_states(
            TYPE, {"data.status": SEARCH_STATUS}, per_page=PER_PAGE, order_by="state_id"
        )

    with captured_sql(engine) as sent:
        page = ours(0)
    with traced_sqlite(conn) as mirrored:
        items, total = base(0)
    same = check_same_sql(figure, sent, mirrored)
    if [dict(s) for s in page] != [{**r, "etag": str(r["version"])} for r in items] or (
        page.total != total
    ):
        raise SystemExit(f"{figure}: the baseline finds different states")
    note = f"{same}; {sqlite_plan(conn)}; page of {PER_PAGE} of {total}"
    return compare(Result(figure, 0.7, note=note), Side(ours), Side(base), profile)


# -- report ---------------------------------------------------------------------


def package_revision() -> str:
    """The git commit the package is at, and whether it has uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(flask_statemanager.__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "flask_statemanager"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return f"git {head}" + (" + uncommitted changes in flask_statemanager/" if dirty else "")


def print_table(results: Sequence[Any], row: Callable[[Any], str] | None = None) -> None:
    """The summary table and verdict; *row* formats the rows that are not a
    :class:`Result` (``bench_redis.py``'s waits)."""
    header = (
        f"{'operation':<34} {'ours ops/s':>11} {'baseline ops/s':>15} {'ratio':>6} "
        f"{'goal':>7}  result"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        print(result_row(r) if isinstance(r, Result) or row is None else row(r))
    failed = [r.figure for r in results if not r.skipped and not r.passed]
    print()
    if failed:
        print(f"FAIL: {len(failed)} of {len(results)} figures miss their goal: {', '.join(failed)}")
    else:
        print("All measured figures meet their goals.")


def result_row(r: Result) -> str:
    goal = ">= " + format(r.goal, ".1f")
    if r.skipped:
        return f"{r.figure:<34} {'-':>11} {'-':>15} {'-':>6} {goal:>7}  SKIPPED ({r.skipped})"
    verdict = "PASS" if r.passed else "FAIL  <-- below goal"
    return (
        f"{r.figure:<34} {r.ours:>11.1f} {r.baseline:>15.1f} {r.ratio:>6.3f} {goal:>7}  {verdict}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 5k states, 3 short rounds")
    parser.add_argument("--rows", type=int, help="states to load (default 100000, quick 5000)")
    parser.add_argument("--rounds", type=int, help="alternating rounds per figure")
    parser.add_argument(
        "--postgres-url",
        help="PostgreSQL database to use (its statemanager_* tables are "
        f"dropped!); default: database {BENCH_DATABASE!r} on the server of "
        "STATEMANAGER_TEST_POSTGRES_URL, created if missing",
    )
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-sqlite", action="store_true")
    args = parser.parse_args(argv)

    profile = QUICK if args.quick else FULL
    if args.rows or args.rounds:
        profile = Profile(
            profile.name + "*",
            rows=max(args.rows or profile.rows, 1000),
            rounds=args.rounds or profile.rounds,
            round_seconds=profile.round_seconds,
            warmup_seconds=profile.warmup_seconds,
            update_pool=profile.update_pool,
        )

    import psycopg

    print(
        f"flask-statemanager {flask_statemanager.__version__} core benchmarks "
        f"({profile.name}: {profile.rows} states, {profile.rounds} rounds, "
        f"~{profile.round_seconds}s per side per round)"
    )
    print(
        f"Python {platform.python_version()}, SQLAlchemy {sa.__version__}, "
        f"psycopg {psycopg.__version__}, SQLite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"package: {package_revision()}")
    started = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="statemanager-bench-")
    results: list[Result] = []
    try:
        if not args.no_postgres:
            results += run_postgres(profile, pg_bench_url(args.postgres_url), tmp)
        if not args.no_sqlite:
            results += run_sqlite(profile, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(results)
    print(
        f"(ratio = median ops/s of ours / median ops/s of the baseline over {profile.rounds} "
        f"alternating rounds; total {time.perf_counter() - started:.0f}s, "
        f"load average now {os.getloadavg()[0]:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
