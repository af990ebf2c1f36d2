"""Health benchmark: a whole ``GET /health`` with a million states in PostgreSQL.

Loads ``--rows`` states (default 1 000 000, plus one history entry each) into a
database of its own, ``statemanager_h1_bench`` on the server of
``STATEMANAGER_TEST_POSTGRES_URL``: a few through the API, the rest by COPY in
exactly the shape the store writes (checked column by column), then ANALYZE.
It then times whole ``GET /health`` requests through the Flask test client
and prints their median and p95 against the 20 ms goal, next to what an exact
``COUNT(*)`` of the live states costs on the same table.

Usage::

    .venv/bin/python benchmarks/bench_health.py            # 1M states (~2-4 min to load)
    .venv/bin/python benchmarks/bench_health.py --reuse    # keep the loaded table if complete
    .venv/bin/python benchmarks/bench_health.py --quick    # smoke run: 60k states (~10 s)

The exit code is 0 whatever the figures are: this is a report, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import bench_core as core
import sqlalchemy as sa
from flask import Flask

from flask_statemanager import StateManager
from flask_statemanager.records import CHANGE_KEYS

TYPE = "user"
API_SEEDED = 10
GOAL_MS = 20.0
BENCH_DATABASE = "statemanager_h1_bench"
PG_DEFAULT_URL = "postgresql://postgres@127.0.0.1:54329/statemanager_test"
#: The columns as the store writes them, the history's with its hash.
STATE_COLUMNS = core.STATE_COLUMNS
HISTORY_COLUMNS = CHANGE_KEYS
data_for = core.data_for


def state_id(i: int) -> str:
    return f"user-{i:07d}"


def bench_url(given: str | None) -> str:
    if given:
        return given
    base = sa.make_url(os.environ.get("STATEMANAGER_TEST_POSTGRES_URL") or PG_DEFAULT_URL)
    return base.set(database=BENCH_DATABASE).render_as_string(hide_password=False)


def make_app(url: str, instance_path: str) -> tuple[Flask, StateManager]:
    StateManager.reset_instance()
    app = Flask("bench_health", instance_path=instance_path)
    app.config["STATEMANAGER_DATABASE_URI"] = url
    sm = StateManager()
    sm.register_type(TYPE)
    sm.init_app(app)
    return app, sm


def copy_rows(conn: Any, start: int, rows: int) -> None:
    """COPY states ``start..rows`` and their create entries, shaped like the API's."""
    from psycopg.types.json import Jsonb

    now = datetime.now(UTC)
    meta = Jsonb({"version": "1.0"})
    create_meta = Jsonb({"from_status": None, "to_status": "pending"})
    with conn.cursor() as cur:
        with cur.copy(f"COPY statemanager_states ({', '.join(STATE_COLUMNS)}) FROM STDIN") as cp:
            for i in range(start, rows):
                sid = state_id(i)
                cp.write_row(
                    (sid, sid, TYPE, "pending", Jsonb(data_for(i)), meta, 1, now, now, None)
                )
        with cur.copy(f"COPY statemanager_history ({', '.join(HISTORY_COLUMNS)}) FROM STDIN") as cp:
            for i in range(start, rows):
                sid, change_id = state_id(i), uuid.uuid4().hex
                row = (change_id, sid, 1, "create", None, Jsonb(data_for(i)), None)
                cp.write_row(
                    (*row, create_meta, now, core.create_hash(change_id, sid, data_for(i), now))
                )
    conn.commit()


def shape_check(conn: Any) -> None:
    """An API-written row and a COPY-written row agree on every column but values."""
    for table, columns, key in (
        ("statemanager_states", STATE_COLUMNS, "state_id"),
        ("statemanager_history", HISTORY_COLUMNS, "state_id"),
    ):
        api, made = (
            conn.execute(
                f"SELECT {', '.join(columns)} FROM {table} WHERE {key} = %s", (state_id(i),)
            ).fetchone()
            for i in (0, API_SEEDED)
        )
        for column, a, m in zip(columns, api, made, strict=True):
            same = type(a) is type(m) and (
                not isinstance(a, dict)
                or (a.keys() == m.keys() if column != "metadata" else a == m)
            )
            if not same:
                sys.exit(f"{table}.{column}: the API wrote {a!r}, the bulk load {m!r}")
    conn.rollback()


def load(url: str, rows: int, instance_path: str, reuse: bool) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        if reuse:
            found = admin.execute(
                "SELECT count(*) FROM statemanager_states WHERE state_id LIKE 'user-%%'"
            ).fetchone()
            if found and found[0] == rows:
                print(f"  reusing the {rows} states already loaded")
                return
        admin.execute("DROP TABLE IF EXISTS statemanager_history, statemanager_states")
    app, sm = make_app(url, instance_path)
    start = time.perf_counter()
    with app.app_context():
        sm.create_all()
        for i in range(API_SEEDED):
            sm.register_state(state_id(i), TYPE, {"data": data_for(i)})
    StateManager.reset_instance()
    with psycopg.connect(url) as conn:
        copy_rows(conn, API_SEEDED, rows)
        shape_check(conn)
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("VACUUM ANALYZE statemanager_states")
        admin.execute("VACUUM ANALYZE statemanager_history")
    print(f"  loaded {rows} states (+ history) in {time.perf_counter() - start:.1f}s")


def exact_count_ms(url: str) -> tuple[int, float]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        times, count = [], 0
        for _ in range(3):
            t0 = time.perf_counter()
            row = conn.execute(
                "SELECT count(*) FROM statemanager_states "
                "WHERE status NOT IN ('deleted', 'expired')"
            ).fetchone()
            times.append((time.perf_counter() - t0) * 1000)
            count = row[0] if row else 0
    return count, statistics.median(times)


def measure(url: str, instance_path: str, requests: int) -> dict[str, Any]:
    app, _sm = make_app(url, instance_path)
    client = app.test_client()
    try:
        for _ in range(max(10, requests // 10)):  # warm the pool and the plan cache
            client.get("/health")
        times = []
        body: Any = None
        for _ in range(requests):
            t0 = time.perf_counter()
            response = client.get("/health")
            times.append((time.perf_counter() - t0) * 1000)
            body = response.get_json()
            if response.status_code != 200:
                sys.exit(f"GET /health answered {response.status_code}: {body}")
    finally:
        StateManager.reset_instance()
    times.sort()
    return {
        "median": statistics.median(times),
        "p95": times[int(len(times) * 0.95) - 1],
        "max": times[-1],
        "body": body,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60k states, 100 requests")
    parser.add_argument("--rows", type=int, help="states to load (default 1 000 000)")
    parser.add_argument("--requests", type=int, help="timed requests (default 500)")
    parser.add_argument("--reuse", action="store_true", help="keep a complete earlier load")
    parser.add_argument(
        "--postgres-url", help=f"database to use (default: {BENCH_DATABASE} on the test server)"
    )
    args = parser.parse_args()
    rows = args.rows or (60_000 if args.quick else 1_000_000)
    requests = args.requests or (100 if args.quick else 500)
    url = bench_url(args.postgres_url)
    core.pg_ensure_database(url)
    print(f"PostgreSQL: {sa.make_url(url).render_as_string(hide_password=True)}")
    with tempfile.TemporaryDirectory() as tmp:
        load(url, rows, tmp, args.reuse)
        exact, count_ms = exact_count_ms(url)
        result = measure(url, tmp, requests)
    body = result["body"]
    verdict = "OK" if result["median"] < GOAL_MS else "FAIL"
    print(
        f"  state_count reported {body['state_count']} "
        f"({'exact' if body['state_count_exact'] else 'estimate'}); exact {exact}, "
        f"an exact COUNT(*) takes {count_ms:.1f} ms"
    )
    print(
        f"  GET /health over {requests} requests: median {result['median']:.2f} ms, "
        f"p95 {result['p95']:.2f} ms, max {result['max']:.2f} ms "
        f"(goal: median < {GOAL_MS:.0f} ms) {verdict}"
    )


if __name__ == "__main__":
    main()
