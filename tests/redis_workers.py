"""Entry points for the multi-process Redis tests (importable by spawned children)."""

from __future__ import annotations

from typing import Any

from flask import Flask

from flask_statemanager import StateManager, StateManagerError


def _app(redis_url: str, instance_path: str) -> Flask:
    app = Flask("redis_worker", instance_path=instance_path)
    app.config.update(STATEMANAGER_STORE="redis", STATEMANAGER_REDIS_URL=redis_url)
    StateManager().init_app(app)
    return app


def increment(redis_url: str, instance_path: str, state_id: str, times: int) -> int:
    """``atomic_update`` a counter *times* times with the default retries; return failures."""
    app = _app(redis_url, instance_path)
    failures = 0
    with app.app_context():
        manager = StateManager()
        for _ in range(times):
            try:
                manager.atomic_update(state_id, lambda d: {**d, "count": d["count"] + 1})
            except StateManagerError as exc:
                failures += 1
                print("increment failed:", repr(exc), flush=True)
    return failures


def write_forever(redis_url: str, instance_path: str, state_id: str, ready: Any) -> None:
    """Update a state in a tight loop until killed."""
    app = _app(redis_url, instance_path)
    with app.app_context():
        manager = StateManager()
        ready.set()
        n = 0
        while True:
            n += 1
            manager.update_state(state_id, {"data": {"n": n, "pad": "x" * 2000}})
