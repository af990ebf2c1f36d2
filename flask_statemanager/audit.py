"""Tamper-evident history: every history entry is hashed, chained to the one before.

An entry's ``hash`` is the SHA-256 of the previous entry's hash (of the same
state; empty for its first entry) and the entry's canonical JSON: every key but
``hash``, sorted, timestamps in ISO-8601 UTC. The engine seals each change
inside the write pipeline, over the plaintext (so re-encrypting stored values
never changes a hash), before the store commits it with the state. Editing,
deleting or reordering an entry breaks the chain from there on, and the state
record itself must match the newest entry (version and data); :func:`verify`
names the first entry where that fails. Retention may remove a state's oldest
entries: verification then starts from the oldest one left.

A hash proves integrity against edits made behind the application's back, not
authorship: whoever can rewrite the whole table can also recompute the chain.
Keep an exported checksum (``flask states export``) or the latest hashes
elsewhere to detect that too.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from .records import Change, State, isoformat

#: Negative zero as a JSON number: PostgreSQL's jsonb turns it into 0.0.
_NEGATIVE_ZERO = re.compile(rb"(?<=[:\[,])-0\.0(?=[,\]}])")
_HEX64 = re.compile(r"[0-9a-f]{64}")
#: Sorted keys; the timestamp goes through records.isoformat, as in to_json().
_CANONICAL = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
#: The same bytes for an entry whose timestamp is in UTC, without a call back
#: into Python: orjson writes it as ``isoformat()`` does, ``Z`` for ``+00:00``.
_CANONICAL_UTC = orjson.OPT_SORT_KEYS | orjson.OPT_UTC_Z


def canonical(change: Mapping[str, Any]) -> bytes:
    """The bytes an entry's hash covers: sorted-key JSON without ``hash``.

    Numbers are written as every store gives them back (``-0.0`` as ``0.0``),
    so a chain verifies the same on every store and after export/import.
    """
    doc = dict(change)
    doc.pop("hash", None)
    created = doc.get("created_at")
    if type(created) is datetime and created.tzinfo is UTC:  # what the engine writes
        encoded = orjson.dumps(doc, option=_CANONICAL_UTC)
    else:
        encoded = orjson.dumps(doc, default=isoformat, option=_CANONICAL)
    return _NEGATIVE_ZERO.sub(b"0.0", encoded) if b"-0.0" in encoded else encoded


def chain_hash(previous: str | None, change: Mapping[str, Any]) -> str:
    """The hash of *change* following an entry whose hash is *previous*."""
    return hashlib.sha256(
        b"%s\n%s" % ((previous or "").encode("ascii"), canonical(change))
    ).hexdigest()


def seal(changes: Sequence[Change], heads: Mapping[str, str | None]) -> None:
    """Set the ``hash`` of *changes*, in commit order, chained from *heads*.

    :param heads: each state's newest stored hash (``None``: no history yet);
        several changes of one state in a batch chain one after another.
    """
    latest = dict(heads)
    for change in changes:
        state_id = change["state_id"]
        change["hash"] = latest[state_id] = chain_hash(latest.get(state_id), change)


@dataclass(frozen=True)
class BrokenLink:
    """Where a state's history stops verifying.

    :param version: the version of the first entry that fails (``None``: the
        state record itself does not match its history).
    """

    state_id: str
    version: int | None
    reason: str

    def __str__(self) -> str:
        where = f"version {self.version}" if self.version is not None else "the state record"
        return f"{self.state_id}: {where}: {self.reason}"


def verify(state_id: str, history: Sequence[Change], state: State | None) -> BrokenLink | None:
    """Check *history* (oldest first) of *state_id* and its record; ``None`` if intact.

    The chain starts from the oldest entry present: its own hash is trusted
    as the anchor when retention removed the entries before it.
    """
    previous: str | None = None
    expected_version: int | None = None
    for position, change in enumerate(history):
        version = change["version"]
        if expected_version is not None and version != expected_version:
            return BrokenLink(
                state_id, version, f"follows version {expected_version - 1}: entries are missing"
            )
        stored = change.get("hash")
        if not stored:
            return BrokenLink(state_id, version, "has no hash (written before sealing)")
        if position == 0 and version != 1:
            # Retention removed the entries before: this one anchors the chain.
            if not _HEX64.fullmatch(stored):
                return BrokenLink(state_id, version, "hash is not a SHA-256 hex digest")
        elif stored != chain_hash(previous, change):
            return BrokenLink(
                state_id,
                version,
                "hash does not match its contents and the entry before it: "
                "this entry or an earlier one was altered",
            )
        previous = stored
        expected_version = version + 1
    if state is not None and history:
        last = history[-1]
        if state["version"] != last["version"]:
            return BrokenLink(
                state_id,
                None,
                f"is at version {state['version']} but its newest history entry is "
                f"version {last['version']}",
            )
        if last["new_data"] is not None and state["data"] != last["new_data"]:
            return BrokenLink(state_id, None, "data differs from its newest history entry")
    elif state is not None:
        return BrokenLink(state_id, None, f"is at version {state['version']} but has no history")
    return None
