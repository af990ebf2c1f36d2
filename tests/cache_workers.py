"""Entry points for the multi-process cache tests (importable by spawned children)."""

from __future__ import annotations

from flask import Flask

from flask_statemanager import StateManager, StateManagerError


def increment(
    database_uri: str, redis_url: str, instance_path: str, state_id: str, times: int
) -> int:
    """``atomic_update`` a counter *times* times through the cache; return the failures.

    After each increment the process reads the counter back through the cache:
    a version older than the one it just committed counts as a failure too.
    """
    app = Flask("cache_worker", instance_path=instance_path)
    app.config.update(STATEMANAGER_DATABASE_URI=database_uri, STATEMANAGER_REDIS_URL=redis_url)
    StateManager().init_app(app)
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
            read = manager.get_state(state_id)
            if read is None or read["version"] < written["version"]:
                failures += 1
                print("stale read:", read, "after writing", written, flush=True)
    return failures
