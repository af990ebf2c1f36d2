"""The ``flask states`` commands: list, search, transition, stats, export and import.

Export and import run between real stores: SQLite → PostgreSQL, SQL → the Redis
store, and back, comparing every record and history entry and the checksums
both ends print.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import Result
from flask import Flask

from flask_statemanager import StateManager

from .conftest import make_app

COMMANDS = ["init-db", "list", "search", "show", "history", "transition", "sweep", "stats"]
COMMANDS += ["export", "import"]


def _app(tmp_path: Path, name: str, **config: Any) -> Flask:
    app = make_app(tmp_path / name, **config)
    StateManager().init_app(app)
    with app.app_context():
        StateManager().create_all()
        StateManager().store.reset()
    return app


def run(app: Flask, *args: str, input: str | bytes | None = None) -> Result:
    return app.test_cli_runner().invoke(args=["states", *args], input=input)


def ok(app: Flask, *args: str, input: str | bytes | None = None) -> Result:
    result = run(app, *args, input=input)
    assert result.exit_code == 0, result.output
    return result


def refused(app: Flask, *args: str, input: str | bytes | None = None) -> str:
    """Run a command that must fail with a message; return its error output."""
    result = run(app, *args, input=input)
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Error:" in result.stderr
    return result.stderr


def checksum(text: str, label: str = "Checksum") -> str:
    found = re.search(label + r":\s+(sha256:[0-9a-f]{64})", text)
    assert found, text
    return found.group(1)


def snapshot(app: Flask) -> dict[str, Any]:
    """Every stored record with its history, by id, as the store returns them."""
    with app.app_context():
        store = StateManager().store
        return {
            s["state_id"]: (s, store.history(s["state_id"]))
            for batch in store.scan()
            for s in batch
        }


@pytest.fixture(autouse=True)
def _types() -> None:
    StateManager().register_type("user", indexes=["data.status"])


@pytest.fixture
def sqlite_app(tmp_path: Path) -> Flask:
    return _app(tmp_path, "sqlite")


@pytest.fixture
def postgres_app(tmp_path: Path, postgres_url: str) -> Iterator[Flask]:
    app = _app(
        tmp_path, "pg", STATEMANAGER_DATABASE_URI=postgres_url, STATEMANAGER_TABLE_PREFIX="clix_"
    )
    yield app
    engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS clix_states, clix_history")
    engine.dispose()


@pytest.fixture
def redis_app(tmp_path: Path, clean_redis: str) -> Flask:
    return _app(
        tmp_path,
        "redis",
        STATEMANAGER_STORE="redis",
        STATEMANAGER_REDIS_URL=clean_redis,
        STATEMANAGER_KEY_PREFIX="clix",
    )


def seed(app: Flask) -> None:
    """States with varied histories: updates, transitions, a tombstone, a TTL, odd data."""
    with app.app_context():
        sm = StateManager()
        for n in range(12):
            sm.register_state(
                f"user_{n:02}",
                "user",
                {"data": {"status": "active" if n % 3 else "new", "age": 20 + n, "n": n}},
                actor="seed",
            )
        sm.transition("user_01", "activate", actor="ann")
        sm.transition("user_01", "suspend", data={"status": "held", "reason": "fraud"})
        sm.update_state(
            "user_02",
            {"data": {"nested": {"list": [1, 2.5, None, True, "ü €"]}, "big": 2**62, "f": 0.1}},
        )
        sm.patch_state("user_02", {"extra": {"a": 1}})
        sm.delete_state("user_03", actor="gdpr")
        sm.rollback("user_02", 1)
        sm.register_state("sess_1", "session", {"data": {"cart": []}}, ttl=3600)


# -- help and argument errors ---------------------------------------------------------


def test_every_command_has_help(sqlite_app: Flask) -> None:
    listing = ok(sqlite_app, "--help").output
    for command in COMMANDS:
        assert command in listing
        text = ok(sqlite_app, command, "--help").output
        assert f"states {command} " in text.splitlines()[0]
        assert len(text.splitlines()) > 4  # a description and the options


def test_list_pages_and_formats(sqlite_app: Flask) -> None:
    seed(sqlite_app)
    table = ok(sqlite_app, "list", "--type", "user", "--order-by", "state_id")
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["STATE_ID", "TYPE", "STATUS", "VERSION", "UPDATED_AT"]
    ids = [line.split()[0] for line in lines[1:]]
    assert ids == [f"user_{n:02}" for n in range(12) if n != 3]  # deleted states are not live
    assert "Page 1 of 1 (11 state(s))" in table.stderr
    first = ok(
        sqlite_app, "list", "--limit", "4", "--page", "2", "--order-by", "state_id", "--json"
    )
    records = [json.loads(line) for line in first.stdout.splitlines()]
    assert [r["state_id"] for r in records] == ["user_04", "user_05", "user_06", "user_07"]
    assert records[0]["type"] == "user" and records[0]["version"] == 1
    every = ok(sqlite_app, "list", "--json", "--per-page", "50")
    assert len(every.stdout.splitlines()) == 12  # eleven users and the session


def test_list_bad_arguments(sqlite_app: Flask) -> None:
    assert "Unknown state type 'nope'" in refused(sqlite_app, "list", "--type", "nope")
    assert "Cannot order by 'colour'" in refused(sqlite_app, "list", "--order-by", "colour")
    assert "STATEMANAGER_MAX_PER_PAGE" in refused(sqlite_app, "list", "--per-page", "100000")
    assert "is not in the range" in refused(sqlite_app, "list", "--page", "0")


USAGE_ERRORS = [
    (["list", "--per-page", "100000"], "Must be between 1 and 500 (STATEMANAGER_MAX_PER_PAGE)"),
    (["list", "--page", "1000000000000"], "Pages are numbered from 1 to 10**9"),
    (["list", "--page", "0"], "is not in the range x>=1"),
    (["list", "--order-by", "bogus"], "Cannot order by 'bogus'"),
    (["search", "user", "data.plan=pro", "--order-by", "data.plan"], "Cannot order by 'data.plan'"),
    (["search", "user", "--per-page", "501"], "STATEMANAGER_MAX_PER_PAGE"),
    (["migrate", "--type", "nosuch"], "Unknown state type 'nosuch'"),
    (["prune", "--type", "nosuch"], "Unknown state type 'nosuch'"),
    (["export", "--type", "nosuch"], "Unknown state type 'nosuch'"),
    (["sweep", "--limit", "0"], "is not in the range x>=1"),
]


@pytest.mark.parametrize(
    ("args", "message"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS]
)
def test_bad_arguments_are_usage_errors(sqlite_app: Flask, args: list[str], message: str) -> None:
    seed(sqlite_app)
    before = snapshot(sqlite_app)
    result = run(sqlite_app, *args)
    assert result.exit_code == 2, result.output  # click's status for a usage error
    assert "Error: Invalid value for" in result.stderr and message in result.stderr
    assert f" states {args[0]} --help' for help." in result.stderr
    assert snapshot(sqlite_app) == before


def test_refused_operations_exit_1(sqlite_app: Flask) -> None:
    seed(sqlite_app)
    for args, message in [
        (["show", "nobody"], "No state 'nobody'"),
        (["transition", "user_00", "resume"], "resume"),
    ]:
        result = run(sqlite_app, *args)
        assert result.exit_code == 1, result.output
        assert message in result.stderr and "Usage:" not in result.stderr
    # A page past the end is no error: an empty page.
    assert "Page 1000 of 1" in ok(sqlite_app, "list", "--page", "1000", "--per-page", "500").stderr


def test_search_filters(sqlite_app: Flask) -> None:
    seed(sqlite_app)

    def found(*filters: str) -> list[str]:
        result = ok(sqlite_app, "search", "user", *filters, "--json", "--order-by", "state_id")
        return [json.loads(line)["state_id"] for line in result.stdout.splitlines()]

    assert found("data.status=new") == ["user_00", "user_06", "user_09"]  # user_03 is deleted
    assert found("data.status=active", "data.age__gte=30") == ["user_10", "user_11"]
    assert found("data.n__in=[4, 5]") == ["user_04", "user_05"]
    assert found("status=suspended") == ["user_01"]
    assert found('data.status="held"', "data.reason__exists=true") == ["user_01"]
    assert found("data.n=4") == ["user_04"]
    assert found('data.n="4"') == []  # a quoted number is a string
    assert found() == [f"user_{n:02}" for n in range(12) if n != 3]
    table = ok(sqlite_app, "search", "user", "data.age__lt=21")
    assert table.stdout.splitlines()[1].split()[:3] == ["user_00", "user", "pending"]


def test_search_bad_arguments(sqlite_app: Flask) -> None:
    assert "Unknown state type 'nope'" in refused(sqlite_app, "search", "nope", "data.x=1")
    assert "is not FIELD=VALUE" in refused(sqlite_app, "search", "user", "data.status")
    assert "is not FIELD=VALUE" in refused(sqlite_app, "search", "user", "=active")
    assert "unknown operator __near" in refused(sqlite_app, "search", "user", "data.x__near=1")
    assert "dotted path into data" in refused(sqlite_app, "search", "user", "colour=red")
    assert "__in takes a non-empty list" in refused(sqlite_app, "search", "user", "data.x__in=3")
    assert "given twice" in refused(sqlite_app, "search", "user", "data.x=1", "data.x=2")
    assert "Missing argument 'TYPE'" in refused(sqlite_app, "search")


def test_show_history_sweep_bad_arguments(sqlite_app: Flask) -> None:
    seed(sqlite_app)
    assert "No state 'nobody'" in refused(sqlite_app, "show", "nobody")
    assert "No history for state 'nobody'" in refused(sqlite_app, "history", "nobody")
    assert "Invalid state_id" in refused(sqlite_app, "history", "bad id")
    assert "Missing argument 'STATE_ID'" in refused(sqlite_app, "history")
    assert "is not in the range x>=1" in refused(sqlite_app, "sweep", "--limit", "0")
    # A deleted state's history is still there.
    deleted = ok(sqlite_app, "history", "user_03").stdout.splitlines()
    assert [json.loads(line)["actor"] for line in deleted] == ["seed", "gdpr"]


# -- transition -------------------------------------------------------------------------


def test_transition(sqlite_app: Flask) -> None:
    seed(sqlite_app)
    result = ok(sqlite_app, "transition", "user_00", "activate")
    record = json.loads(result.stdout)
    assert (record["status"], record["version"]) == ("active", 2)
    result = ok(
        sqlite_app,
        "transition",
        "user_00",
        "suspend",
        "--data",
        '{"status": "held"}',
        "--actor",
        "ops",
        "--expected-version",
        "2",
    )
    assert json.loads(result.stdout)["data"] == {"status": "held"}
    with sqlite_app.app_context():
        history = StateManager().get_state_history("user_00")
    assert [(c["transition"], c["actor"]) for c in history] == [
        ("create", "seed"),
        ("activate", "cli"),
        ("suspend", "ops"),
    ]


def test_transition_bad_arguments(sqlite_app: Flask) -> None:
    seed(sqlite_app)
    assert "'nobody' does not exist" in refused(sqlite_app, "transition", "nobody", "activate")
    assert "'user_03' does not exist" in refused(sqlite_app, "transition", "user_03", "activate")
    assert "frobnicate" in refused(sqlite_app, "transition", "user_00", "frobnicate")
    assert "not allowed" in refused(sqlite_app, "transition", "user_00", "resume")
    assert "not JSON" in refused(sqlite_app, "transition", "user_00", "activate", "--data", "{x")
    assert "must be a JSON object" in refused(
        sqlite_app, "transition", "user_00", "activate", "--data", "[1]"
    )
    conflict = refused(sqlite_app, "transition", "user_00", "activate", "--expected-version", "7")
    assert "version" in conflict
    assert "Invalid state_id" in refused(sqlite_app, "transition", "bad id", "activate")
    assert "Missing argument 'TRANSITION'" in refused(sqlite_app, "transition", "user_00")
    with sqlite_app.app_context():
        state = StateManager().get_state("user_00")
    assert state is not None and (state["status"], state["version"]) == ("pending", 1)


# -- stats --------------------------------------------------------------------------------


def test_stats(sqlite_app: Flask) -> None:
    seed(sqlite_app)
    text = ok(sqlite_app, "stats").stdout
    assert "Store: sql" in text
    assert "States: 13" in text
    assert "user: 12 (deleted 1, pending 10, suspended 1)" in text
    assert "session: 1 (pending 1)" in text
    assert "History entries: 19" in text
    assert "Cache: none" in text
    report = json.loads(ok(sqlite_app, "stats", "--json").stdout)
    assert report["by_type"]["user"]["deleted"] == 1
    assert report["history_entries"] == 19 and report["cache_hit_rate"] is None


def test_stats_with_cache(tmp_path: Path, postgres_url: str, clean_redis: str) -> None:
    app = _app(
        tmp_path,
        "cached",
        STATEMANAGER_DATABASE_URI=postgres_url,
        STATEMANAGER_TABLE_PREFIX="clix_",
        STATEMANAGER_REDIS_URL=clean_redis,
    )
    try:
        with app.app_context():
            sm = StateManager()
            sm.register_state("u1", "user", {"data": {}})
            for _ in range(3):
                sm.get_state("u1")
            # One runtime per app: the command sees this process's counters.
            report = json.loads(ok(app, "stats", "--json").stdout)
        assert report["store"] == "sql" and report["states"] == 1
        assert report["cache_hit_rate"] is not None and report["cache_hit_rate"] > 0
        assert "Cache hit rate:" in ok(app, "stats").stdout
    finally:
        engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS clix_states, clix_history")
        engine.dispose()


# -- export and import between stores ----------------------------------------------------------


def _copy(source: Flask, target: Flask, tmp_path: Path, *options: str) -> tuple[str, str, str]:
    """Export *source* to a file, import it into *target*; the three checksums printed."""
    path = tmp_path / f"{source.name}-{target.name}.jsonl"
    exported = ok(source, "export", "--output", str(path), *options)
    imported = ok(target, "import", str(path))
    return (
        checksum(exported.stdout),
        checksum(imported.stdout, "Checksum of the file"),
        checksum(imported.stdout, "Checksum of the store"),
    )


def test_sqlite_to_postgres_and_back_is_identical(
    sqlite_app: Flask, postgres_app: Flask, tmp_path: Path
) -> None:
    seed(sqlite_app)
    original = snapshot(sqlite_app)
    assert len(original) == 13 and original["user_03"][0]["status"] == "deleted"
    assert [c["version"] for c in original["user_02"][1]] == [1, 2, 3, 4]

    sums = _copy(sqlite_app, postgres_app, tmp_path)
    assert len(set(sums)) == 1
    assert snapshot(postgres_app) == original  # every record and history entry, timestamps too
    # Both stores export the same bytes, and the copy works like the original.
    path = tmp_path / "again.jsonl"
    again = ok(postgres_app, "export", "-o", str(path))
    assert checksum(again.stdout) == sums[0]
    assert (
        path.read_bytes()
        == (tmp_path / f"{sqlite_app.name}-{postgres_app.name}.jsonl").read_bytes()
    )
    with postgres_app.app_context():
        sm = StateManager()
        assert [s["state_id"] for s in sm.search_states("user", {"data.status": "held"})] == [
            "user_01"
        ]
        assert sm.transition("user_01", "resume")["version"] == 4

    back = _app(tmp_path, "back")
    sums_back = _copy(postgres_app, back, tmp_path)
    assert len(set(sums_back)) == 1 and sums_back[0] != sums[0]  # user_01 moved on
    assert snapshot(back) == snapshot(postgres_app)


def test_sql_to_redis_store_and_back_is_identical(
    sqlite_app: Flask, redis_app: Flask, tmp_path: Path
) -> None:
    seed(sqlite_app)
    original = snapshot(sqlite_app)
    sums = _copy(sqlite_app, redis_app, tmp_path)
    assert len(set(sums)) == 1
    assert snapshot(redis_app) == original
    with redis_app.app_context():
        sm = StateManager()
        active = sm.search_states("user", {"data.status": "active"}, per_page=100)
        assert active.total == 7  # the declared index was filled by the import
        assert sm.get_state("user_03") is None  # a tombstone stays one
        assert [c["transition"] for c in sm.get_recent_changes("sess_1")] == ["create"]
        assert sm.store.count() == 12
    memory = _app(tmp_path, "memory", STATEMANAGER_STORE="memory")
    assert len(set(_copy(redis_app, memory, tmp_path))) == 1
    assert snapshot(memory) == original


def test_export_to_stdout_and_import_from_stdin(
    sqlite_app: Flask, postgres_app: Flask, tmp_path: Path
) -> None:
    seed(sqlite_app)
    exported = ok(sqlite_app, "export", "--type", "user")
    lines = exported.stdout.splitlines()
    assert len(lines) == 12 and all(json.loads(line)["state"]["type"] == "user" for line in lines)
    # The summary goes to standard error, with no progress bar mixed into the data.
    assert "Exported 12 state(s) with 18 change(s)" in exported.stderr
    assert "Exporting" not in exported.stderr
    to_file = ok(sqlite_app, "export", "-o", str(tmp_path / "f.jsonl"))
    assert "Exporting" in to_file.stderr
    imported = ok(postgres_app, "import", input=exported.stdout)
    assert "Imported 12 state(s) with 18 change(s) into the sql store" in imported.stdout
    assert checksum(imported.stdout, "Checksum of the store") == checksum(exported.stderr)
    assert "Importing" in imported.stderr


def test_import_refuses_stored_states_unless_replace(
    sqlite_app: Flask, postgres_app: Flask, tmp_path: Path
) -> None:
    seed(sqlite_app)
    path = tmp_path / "all.jsonl"
    ok(sqlite_app, "export", "-o", str(path))
    with postgres_app.app_context():
        StateManager().register_state("user_05", "user", {"data": {"mine": True}})
    message = refused(postgres_app, "import", str(path))
    assert "'user_05' is already stored" in message and "--replace" in message
    assert list(snapshot(postgres_app)) == ["user_05"]  # nothing was imported
    ok(postgres_app, "import", "--replace", str(path))
    assert snapshot(postgres_app) == snapshot(sqlite_app)
    # Importing the same file again with --replace changes nothing.
    again = ok(postgres_app, "import", "--replace", str(path))
    assert checksum(again.stdout, "Checksum of the store") == checksum(again.stdout, "file")


def _line(app: Flask) -> dict[str, Any]:
    exported = ok(app, "export", "--type", "session")
    return json.loads(exported.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: "{not json", "Line 2: not JSON"),
        (lambda d: json.dumps([1]), 'Line 2: expected an object with the keys "state"'),
        (lambda d: json.dumps({**d, "extra": 1}), "Line 2: expected an object with the keys"),
        (lambda d: json.dumps({**d, "history": {}}), '"history" a list'),
        (
            lambda d: json.dumps({**d, "state": {**d["state"], "type": "ghost"}}),
            "Line 2: Unknown state type 'ghost'",
        ),
        (
            lambda d: json.dumps({**d, "state": {**d["state"], "state_id": "a b"}}),
            "Line 2: Invalid state_id",
        ),
        (
            lambda d: json.dumps({**d, "state": {**d["state"], "version": 0}}),
            "version must be a positive integer",
        ),
        (
            lambda d: json.dumps({**d, "state": {**d["state"], "created_at": "yesterday"}}),
            "Line 2: state created_at must be an ISO-8601 timestamp with a time zone",
        ),
        (
            lambda d: json.dumps(
                {**d, "state": {k: v for k, v in d["state"].items() if k != "data"}}
            ),
            "the state lacks data",
        ),
        (
            lambda d: json.dumps(
                {**d, "history": [{**d["history"][0], "created_at": "2024-05-01T12:00:00"}]}
            ),
            "history entry 1 created_at must be an ISO-8601 timestamp with a time zone",
        ),
        (
            lambda d: json.dumps({**d, "history": [{**d["history"][0], "actor": 5}]}),
            "history entry 1: actor must be a string of 1-255 characters or null",
        ),
        (
            lambda d: json.dumps({**d, "history": [{**d["history"][0], "version": 2}]}),
            "is at version 1 but its last history entry is version 2",
        ),
        # Documents are checked as a write checks them: a store only holds checked ones.
        (
            lambda d: json.dumps({**d, "state": {**d["state"], "data": {"note": "a\u0000b"}}}),
            "Line 2: Not JSON-serialisable: state data.note: contains a NUL character",
        ),
        (
            lambda d: json.dumps({**d, "state": {**d["state"], "data": _nested(40)}}),
            "Line 2: state data" + ".x" * 32 + ": nested deeper than 32 levels",
        ),
        (
            lambda d: json.dumps(
                {**d, "history": [{**d["history"][0], "new_data": {"k": "a\u0000"}}]}
            ),
            "Line 2: Not JSON-serialisable: history entry 1 new_data.k: contains a NUL",
        ),
    ],
)
def test_import_rejects_a_bad_line_and_writes_nothing(
    sqlite_app: Flask, postgres_app: Flask, change: Any, message: str
) -> None:
    seed(sqlite_app)
    good = _line(sqlite_app)
    first = ok(sqlite_app, "export", "--type", "user").stdout.splitlines()[0]
    text = "\n".join([first, change(good), ""])
    assert message in refused(postgres_app, "import", input=text)
    assert snapshot(postgres_app) == {}


def _nested(depth: int) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for _ in range(depth):
        document = {"x": document}
    return document


def test_import_other_errors(sqlite_app: Flask, tmp_path: Path) -> None:
    seed(sqlite_app)
    line = json.dumps(_line(sqlite_app))
    target = _app(tmp_path, "target", STATEMANAGER_STORE="memory")
    twice = refused(target, "import", input=f"{line}\n\n{line}\n")
    assert "Line 3: state 'sess_1' was already given on line 1" in twice
    assert "No such file" in refused(target, "import", str(tmp_path / "missing.jsonl"))
    assert snapshot(target) == {}
    # Blank lines are skipped; an empty input imports nothing.
    assert "Imported 1 state(s)" in ok(target, "import", input=f"\n{line}\n\n").stdout
    assert "Imported 0 state(s)" in ok(target, "import", input="").stdout


def test_export_bad_arguments(sqlite_app: Flask, tmp_path: Path) -> None:
    assert "Unknown state type 'nope'" in refused(sqlite_app, "export", "--type", "nope")
    missing = tmp_path / "no" / "such" / "dir" / "out.jsonl"
    assert "No such file or directory" in refused(sqlite_app, "export", "-o", str(missing))


def test_import_stops_at_a_state_the_store_refuses(sqlite_app: Flask, redis_app: Flask) -> None:
    seed(sqlite_app)
    lines = ok(sqlite_app, "export").stdout.splitlines()
    pruned = json.loads(lines[2])  # user_01: three changes
    assert pruned["state"]["state_id"] == "user_01"
    pruned["history"] = pruned["history"][1:]  # as retention would leave it
    text = "\n".join([lines[0], json.dumps(pruned), lines[3]])
    message = refused(redis_app, "import", input=text)
    assert "Line 2: State 'user_01' is at version 3 with 2 history entries" in message
    assert "Restored 1 of 3 states before this one" in message
    # Each state is whole or absent: the first is restored, the refused one not at all.
    assert sorted(snapshot(redis_app)) == ["sess_1"]
    with redis_app.app_context():
        assert StateManager().store.history("user_01") == []


def test_import_sees_a_redis_tombstone_whose_record_was_dropped(
    sqlite_app: Flask, redis_app: Flask, clean_redis: str
) -> None:
    """Redis drops a tombstone's document after a while but keeps its history:
    importing that id is refused up front, before anything is written."""
    seed(sqlite_app)
    text = ok(sqlite_app, "export").stdout
    with redis_app.app_context():
        sm = StateManager()
        sm.register_state("user_03", "user", {"data": {}})
        sm.delete_state("user_03")
    client = redis.Redis.from_url(clean_redis)
    client.delete("clix:state:{user_03}")  # as the tombstone's time-to-live does
    message = refused(redis_app, "import", input=text)
    assert "'user_03' is already stored" in message and "nothing was imported" in message
    assert snapshot(redis_app) == {}
    with redis_app.app_context():
        assert [c["version"] for c in StateManager().get_state_history("user_03")] == [1, 2]
    client.close()


def test_sql_restore_is_all_or_nothing(postgres_app: Flask) -> None:
    with postgres_app.app_context():
        sm = StateManager()
        sm.register_state("u1", "user", {"data": {}})
        sm.transition("u1", "activate")
        state, history = sm.store.get("u1"), sm.store.history("u1")
        assert state is not None
        sm.store.reset()
        # The second history row overflows its column after the state row went in.
        history[1]["transition"] = "x" * 100
        with pytest.raises(Exception, match="too long"):
            sm.store.restore(state, history)
        assert sm.store.get("u1") is None and sm.store.history("u1") == []


def test_export_is_consistent_while_states_change(tmp_path: Path) -> None:
    """A change committed between reading a record and its history is left out."""
    from flask_statemanager.stores.memory import MemoryStore

    app = _app(tmp_path, "racing", STATEMANAGER_STORE="memory")

    class Racing(MemoryStore):
        raced = False

        def history(self, state_id: str, transition: str | None = None) -> list[Any]:
            if not self.raced:
                self.raced = True
                StateManager().transition(state_id, "activate")  # lands mid-export
            return super().history(state_id, transition)

    store = app.extensions["statemanager"].store = Racing()
    with app.app_context():
        StateManager().register_state("u1", "user", {"data": {}})
    exported = ok(app, "export")
    line = json.loads(exported.stdout)
    assert line["state"]["version"] == 1
    assert [c["version"] for c in line["history"]] == [1]
    assert store.raced and len(store.history("u1")) == 2
    target = _app(tmp_path, "target", STATEMANAGER_STORE="memory")
    imported = ok(target, "import", input=exported.stdout)
    assert checksum(imported.stdout, "Checksum of the store") == checksum(exported.stderr)


def test_import_states_takes_the_app_s_depth_limit(tmp_path: Path) -> None:
    """The public import_states() checks documents against STATEMANAGER_MAX_DEPTH, not 32."""
    from flask_statemanager.transfer import encode, import_states

    deep = _nested(40)
    source = _app(tmp_path, "deep_source", STATEMANAGER_STORE="memory", STATEMANAGER_MAX_DEPTH=64)
    target = _app(tmp_path, "deep_target", STATEMANAGER_STORE="memory", STATEMANAGER_MAX_DEPTH=64)
    sm = StateManager()
    with source.app_context():
        state = sm.register_state("deep", "user", {"data": deep})
        line = encode(state, sm.get_state_history("deep"))
    with target.app_context():
        summary = import_states(sm.store, [line], sm.get_type, max_depth=64)
        assert summary.states == 1
        assert sm.get_state("deep")["data"] == deep
