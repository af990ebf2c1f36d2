"""In-process store: the same semantics as the others, for tests and demos.

Not a mock: it implements the whole store contract (compare-and-set, atomic
batches, history, search) and runs the same contract test suite. Data lives in
one Python process and is gone when it ends. Documents are copied on the way in
and out, so callers never share mutable state with the store.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from .. import codec
from ..definitions import DELETED, EXPIRED, TypeDefinition
from ..query import Query, matches
from ..records import Change, State
from .base import (
    ChangeRewrite,
    Plan,
    Pruned,
    Retention,
    StateRewrite,
    Store,
    VersionMismatch,
    Write,
    check_restore,
    restore_refused,
)


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

    def scan(self, state_type: str | None = None, batch_size: int = 500) -> Iterator[list[State]]:
        with self._lock:
            ids = sorted(
                i for i, s in self._states.items() if state_type is None or s["type"] == state_type
            )
        for start in range(0, len(ids), batch_size):
            batch = self.get_many(ids[start : start + batch_size])
            # A state deleted from the dictionaries meanwhile (reset) is left out.
            yield [batch[i] for i in ids[start : start + batch_size] if i in batch]

    def restore(self, state: State, changes: Sequence[Change], *, replace: bool = False) -> None:
        check_restore(state, changes)
        state_id = state["state_id"]
        new_state = _copy_state(state)
        new_history = [_copy_change(c) for c in changes]
        with self._lock:
            if not replace and (state_id in self._states or self._history.get(state_id)):
                raise restore_refused(state_id)
            if state_id in self._history:
                self._log = [c for c in self._log if c["state_id"] != state_id]
            self._states[state_id] = new_state
            self._history[state_id] = new_history
            self._log.extend(new_history)

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

    def count_type(self, type_name: str, limit: int | None = None) -> int:
        with self._lock:
            found = sum(
                1
                for s in self._states.values()
                if s["type"] == type_name and s["status"] not in (DELETED, EXPIRED)
            )
            return found if limit is None else min(found, limit)

    def type_size(self, type_name: str) -> int:
        with self._lock:
            return sum(1 for s in self._states.values() if s["type"] == type_name)

    def prune(
        self,
        type_name: str,
        retention: Retention,
        *,
        batch_size: int = 500,
        dry_run: bool = False,
    ) -> Iterator[Pruned]:
        with self._lock:
            ids = sorted(i for i, s in self._states.items() if s["type"] == type_name)
        for start in range(0, len(ids), batch_size):
            entries, purged, removed = 0, [], set[int]()
            with self._lock:
                for state_id in ids[start : start + batch_size]:
                    state = self._states.get(state_id)
                    if state is None or state["type"] != type_name:
                        continue  # purged or retyped since the list was taken
                    history = self._history.get(state_id, [])
                    if retention.purges(state):
                        entries += len(history)
                        purged.append(state_id)
                        if not dry_run:
                            del self._states[state_id]
                            removed.update(map(id, self._history.pop(state_id, [])))
                        continue
                    count = retention.removable(history)
                    entries += count
                    if count and not dry_run:
                        removed.update(map(id, history[:count]))
                        del history[:count]
                if removed:  # the commit-order log shares the history's entries
                    self._log = [c for c in self._log if id(c) not in removed]
            yield Pruned(len(ids[start : start + batch_size]), entries, tuple(purged))

    def check(self) -> dict[str, Any]:
        return {"component": "memory", "states": self.count()}

    def rewrite(
        self, states: StateRewrite, changes: ChangeRewrite, *, batch_size: int = 500
    ) -> tuple[int, Iterator[int]]:
        with self._lock:
            ids = sorted(self._states.keys() | self._history.keys())

        def run() -> Iterator[int]:
            for start in range(0, len(ids), batch_size):
                batch = ids[start : start + batch_size]
                with self._lock:
                    for state_id in batch:
                        stored = self._states.get(state_id)
                        new = None if stored is None else states(_copy_state(stored))
                        if new is not None and stored is not None:
                            stored["data"] = _copy_state(new)["data"]
                            stored["metadata"] = _copy_state(new)["metadata"]
                        for change in self._history.get(state_id, []):
                            rewritten = changes(_copy_change(change))
                            if rewritten is not None:
                                # The log shares these objects: rewrite in place.
                                fresh = _copy_change(rewritten)
                                change["old_data"] = fresh["old_data"]
                                change["new_data"] = fresh["new_data"]
                yield len(batch)

        return len(ids), run()

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
