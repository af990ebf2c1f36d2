"""In-process store: the same semantics as the others, for tests and demos.

Not a mock: it implements the whole store contract (compare-and-set, atomic
batches, history, search) and runs the same contract test suite. Data lives in
one Python process and is gone when it ends. Documents are copied on the way in
and out, so callers never share mutable state with the store.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from .. import codec
from ..definitions import DELETED, EXPIRED, TypeDefinition
from ..query import Query, matches
from ..records import Change, State
from .base import Plan, Store, VersionMismatch, Write


def _copy_state(state: State) -> State:
    copy = State(state)
    copy["data"] = codec.loads(codec.dumps(state["data"]))
    copy["metadata"] = codec.loads(codec.dumps(state["metadata"]))
    return copy


def _copy_change(change: Change) -> Change:
    return Change(codec.loads(codec.dumps(dict(change))), created_at=change["created_at"])


class MemoryStore(Store):
    """States and history in dictionaries guarded by one lock."""

    kind = "memory"
    embedded = True

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._states: dict[str, State] = {}
        self._history: dict[str, list[Change]] = {}
        self._log: list[Change] = []  # every change in commit order

    def setup(self, types: Iterable[TypeDefinition]) -> None:
        pass

    def get(self, state_id: str) -> State | None:
        with self._lock:
            state = self._states.get(state_id)
            return None if state is None else _copy_state(state)

    def get_many(self, state_ids: Sequence[str]) -> dict[str, State]:
        with self._lock:
            return {i: _copy_state(self._states[i]) for i in state_ids if i in self._states}

    def apply(self, state_ids: Sequence[str], plan: Plan) -> Sequence[Write]:
        # One lock from read to commit: writers queue, as on a locking database.
        with self._lock:
            heads: dict[str, str | None] = {}
            for i in state_ids:
                changes = self._history.get(i)
                heads[i] = changes[-1]["hash"] if changes else None
            writes = plan({i: self.get(i) for i in state_ids}, heads)
            # Check every compare-and-set first (later writes of the same state in
            # one batch build on earlier ones), then apply: all or nothing.
            versions: dict[str, int] = {}
            for write in writes:
                state_id = write.state["state_id"]
                if state_id in versions:
                    current: int | None = versions[state_id]
                else:
                    stored = self._states.get(state_id)
                    current = stored["version"] if stored else None
                if (current or 0) != write.expected_version:
                    raise VersionMismatch(state_id, current)
                versions[state_id] = write.state["version"]
            for write in writes:
                state_id = write.state["state_id"]
                change = _copy_change(write.change)
                self._states[state_id] = _copy_state(write.state)
                self._history.setdefault(state_id, []).append(change)
                self._log.append(change)
            return writes

    def query(self, query: Query) -> tuple[list[State], int]:
        with self._lock:
            rows = [
                s
                for s in self._states.values()
                if s["status"] not in (DELETED, EXPIRED)
                and not s.is_expired(query.now)
                and (query.type is None or s["type"] == query.type)
                and all(matches(s, c) for c in query.conditions)
            ]
            order = query.order
            rows.sort(key=lambda s: s["state_id"], reverse=order.descending)
            rows.sort(
                key=lambda s: _sort_key(s[order.root], order.descending), reverse=order.descending
            )
            page = rows[query.offset : query.offset + query.limit]
            return [_copy_state(s) for s in page], len(rows)

    def history(self, state_id: str, transition: str | None = None) -> list[Change]:
        with self._lock:
            entries = self._history.get(state_id, [])
            return [
                _copy_change(c)
                for c in entries
                if transition is None or c["transition"] == transition
            ]

    def recent_changes(self, state_id: str | None, limit: int) -> list[Change]:
        with self._lock:
            source = self._log if state_id is None else self._history.get(state_id, [])
            return [_copy_change(c) for c in reversed(source[-limit:])]

    def expired(self, now: datetime, limit: int) -> list[State]:
        with self._lock:
            due = [
                _copy_state(s)
                for s in self._states.values()
                if s.is_expired(now) and s["status"] not in (DELETED, EXPIRED)
            ]
            return due[:limit]

    def state_ids(self, after: str | None, limit: int) -> list[str]:
        with self._lock:
            ids = sorted(i for i in self._history if after is None or i > after)
        return ids[:limit]

    def count(self) -> int:
        with self._lock:
            return sum(1 for s in self._states.values() if s["status"] not in (DELETED, EXPIRED))

    def check(self) -> dict[str, Any]:
        return {"component": "memory", "states": self.count()}

    def reset(self) -> None:
        with self._lock:
            self._states.clear()
            self._history.clear()
            self._log.clear()


def _sort_key(value: Any, descending: bool) -> Any:
    # Only expires_at can be None; like the SQL stores' NULLS LAST, it sorts
    # after every value in both directions.
    present = value is not None
    return (present if descending else not present, value if present else 0)
