"""Entry points for the multi-process tests (importable by spawned children).

Each takes the app config that picks the store, so one worker serves every
store: SQL, SQL + Redis cache, and the Redis store.
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from flask_statemanager import StateManager, StateManagerError


def make_app(config: dict[str, Any], instance_path: str) -> Flask:
    """A worker's own app on the store *config* selects."""
    app = Flask("worker", instance_path=instance_path)
    app.config.update(config)
    StateManager().init_app(app)
    return app


def increment(
    config: dict[str, Any], instance_path: str, state_id: str, times: int, read_back: bool = False
) -> int:
    """``atomic_update`` a counter *times* times with the default retries; return the failures.

    :param read_back: also read the counter after each increment; a version
        older than the one just committed counts as a failure (stale cache).
    """
    app = make_app(config, instance_path)
    failures = 0
    with app.app_context():
        manager = StateManager()
        for _ in range(times):
            try:
                written = manager.atomic_update(state_id, lambda d: {**d, "count": d["count"] + 1})
            except StateManagerError as exc:
                failures += 1
                print("increment failed:", repr(exc), flush=True)
                continue
            if read_back:
                read = manager.get_state(state_id)
                if read is None or read["version"] < written["version"]:
                    failures += 1
                    print("stale read:", read, "after writing", written, flush=True)
    return failures


def write_forever(config: dict[str, Any], instance_path: str, state_id: str, ready: Any) -> None:
    """Update a state in a tight loop until killed."""
    app = make_app(config, instance_path)
    with app.app_context():
        manager = StateManager()
        ready.set()
        n = 0
        while True:
            n += 1
            manager.update_state(state_id, {"data": {"n": n, "pad": "x" * 2000}})
