"""The ``flask states`` commands."""

from __future__ import annotations

import json
import time
from pathlib import Path

import sqlalchemy as sa

from flask_statemanager import StateManager

from .conftest import make_app


def test_init_db_show_history_sweep(tmp_path: Path, postgres_url: str) -> None:
    manager = StateManager()
    manager.register_type("user", indexes=["data.status"])
    app = make_app(
        tmp_path, STATEMANAGER_DATABASE_URI=postgres_url, STATEMANAGER_TABLE_PREFIX="cli_"
    )
    manager.init_app(app)
    engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS cli_states, cli_history")
    runner = app.test_cli_runner()
    result = runner.invoke(args=["states", "init-db"])
    assert result.exit_code == 0, result.output
    assert "ready" in result.output
    inspector = sa.inspect(engine)
    assert {"cli_states", "cli_history"} <= set(inspector.get_table_names())
    assert "ix_cli_states_data_status" in {i["name"] for i in inspector.get_indexes("cli_states")}
    assert runner.invoke(args=["states", "init-db"]).exit_code == 0  # idempotent

    with app.app_context():
        manager.register_state("u1", "user", {"data": {"status": "x"}})
        manager.transition("u1", "activate")
        manager.register_state("s1", "session", {"data": {}}, ttl=0.1)
    shown = runner.invoke(args=["states", "show", "u1"])
    assert shown.exit_code == 0
    assert json.loads(shown.output)["status"] == "active"
    history = runner.invoke(args=["states", "history", "u1"])
    assert [json.loads(line)["transition"] for line in history.output.splitlines()] == [
        "create",
        "activate",
    ]
    missing = runner.invoke(args=["states", "show", "nobody"])
    assert missing.exit_code != 0 and "No state" in missing.output
    bad = runner.invoke(args=["states", "show", "bad id"])
    assert bad.exit_code != 0 and "Invalid state_id" in bad.output
    time.sleep(0.2)
    swept = runner.invoke(args=["states", "sweep"])
    assert swept.exit_code == 0 and "Expired 1" in swept.output
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE cli_states, cli_history")
    engine.dispose()
