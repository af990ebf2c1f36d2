"""Export and import: states with their whole history as JSON lines, between any two stores.

One line per state, ``{"history": [...], "state": {...}}``: the record as
:meth:`State.to_json` renders it (tombstones of deleted and expired states
included) and every history entry as stored, oldest first, with every key it
carries. Lines are written in a canonical form — keys sorted, no spaces,
ISO-8601 UTC timestamps — so the same records always give the same bytes,
whichever store they came from.

The :class:`Checksum` of a set of lines is SHA-256 over the SHA-256 of each
line, taken in ``state_id`` order; the order the store listed them in does not
matter. An export prints it; an import prints the checksum of the file *and*
of what it reads back from the destination store after writing, so equal
checksums at both ends prove an identical copy.

An import is a restore, not a series of changes: each state is written with
:meth:`Store.restore` (versions, change ids and timestamps kept, no
validators, signals or new history entries), all or nothing per state. Every
line is read and checked before the first write, so a malformed file writes
nothing.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

import orjson

from .codec import DEFAULT_MAX_DEPTH, check_document, check_text
from .engine import check_state_id
from .errors import ConfigurationError, StateLimitError, StateManagerError, StateValidationError
from .records import CHANGE_KEYS, STATE_COLUMNS, Change, State, parse_time
from .stores.base import Store, check_restore

#: The store is read and the existence of ids checked this many states at a time.
BATCH_SIZE = 500


class TransferError(StateValidationError):
    """An import file is malformed, names states the store already holds, or a
    state of it was refused by the store.

    :param line: the 1-based line number at fault, if one is (also :attr:`line`).
    """

    def __init__(self, message: str, *, line: int | None = None) -> None:
        self.line = line
        where = "file" if line is None else f"line {line}"
        super().__init__(
            f"Line {line}: {message}" if line is not None else message, {where: [message]}
        )


class Checksum:
    """SHA-256 over the SHA-256 of each state's canonical line, in ``state_id`` order."""

    def __init__(self) -> None:
        self._digests: dict[str, bytes] = {}

    def add(self, state_id: str, line: bytes) -> None:
        """Count the canonical *line* of *state_id*."""
        self._digests[state_id] = hashlib.sha256(line).digest()

    def __contains__(self, state_id: object) -> bool:
        return state_id in self._digests

    def __len__(self) -> int:
        return len(self._digests)

    def hexdigest(self) -> str:
        """``sha256:<hex>``; the same records give the same value in any order."""
        total = hashlib.sha256()
        for state_id in sorted(self._digests):
            total.update(self._digests[state_id])
        return "sha256:" + total.hexdigest()


@dataclass(slots=True)
class Summary:
    """What an export or import moved."""

    states: int
    changes: int
    checksum: str
    #: For an import: the checksum of the states as read back from the store.
    stored_checksum: str | None = None


def encode(state: State, history: Iterable[Change]) -> bytes:
    """The canonical line (without newline) of *state* and its *history*."""
    document = {"state": state.to_json(), "history": [c.to_json() for c in history]}
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


def decode(
    line: bytes | str,
    number: int,
    check_type: Callable[[str], object],
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> tuple[State, list[Change]]:
    """Parse and check one line of an export.

    Documents are checked as a write checks them (JSON values only, no NUL,
    at most *max_depth* levels) and their numbers written as every store
    gives them back: a store only ever holds checked documents.

    :raises TransferError: naming *number* and what is wrong.
    """
    try:
        document = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise TransferError(f"not JSON ({exc}).", line=number) from None
    if not isinstance(document, dict) or set(document) != {"state", "history"}:
        raise TransferError(
            'expected an object with the keys "state" and "history", as '
            "flask states export writes.",
            line=number,
        )
    raw_state, raw_history = document["state"], document["history"]
    if not isinstance(raw_state, dict) or not isinstance(raw_history, list):
        raise TransferError('"state" must be an object and "history" a list.', line=number)
    try:
        state = _state(raw_state, check_type, max_depth)
        history = [_change(c, n, max_depth) for n, c in enumerate(raw_history, 1)]
        check_restore(state, history)
    except (StateValidationError, StateLimitError, ValueError, TypeError) as exc:
        raise TransferError(str(exc), line=number) from None
    return state, history


def _state(doc: dict[str, Any], check_type: Callable[[str], object], max_depth: int) -> State:
    missing = [k for k in STATE_COLUMNS if k not in doc]
    unknown = sorted(set(doc) - set(STATE_COLUMNS) - {"etag"})
    if missing or unknown:
        raise ValueError(
            "the state "
            + (f"lacks {', '.join(missing)}" if missing else f"has unknown keys {unknown}")
            + "."
        )
    state_id = check_state_id(doc["state_id"])
    check_type(doc["type"])  # an unregistered type could not be used after the import
    for key, longest in (("name", 255), ("status", 64)):
        check_text(doc[key], f"state {key}", max_length=longest)
    for key in ("data", "metadata"):
        if not isinstance(doc[key], dict):
            raise ValueError(f"state {key} must be an object.")
    data, _ = check_document(doc["data"], "state data", max_depth=max_depth)
    metadata, _ = check_document(doc["metadata"], "state metadata", max_depth=max_depth)
    version = doc["version"]
    if type(version) is not int or version < 1:
        raise ValueError(f"state version must be a positive integer, got {version!r}.")
    if "etag" in doc and doc["etag"] != str(version):
        raise ValueError(f"state etag {doc['etag']!r} is not its version {version}.")
    return State.from_columns(
        state_id,
        doc["name"],
        doc["type"],
        doc["status"],
        data,
        metadata,
        version,
        _time(doc["created_at"], "state created_at"),
        _time(doc["updated_at"], "state updated_at"),
        _time(doc["expires_at"], "state expires_at", optional=True),
    )


def _change(doc: Any, number: int, max_depth: int) -> Change:
    if not isinstance(doc, dict):
        raise ValueError(f"history entry {number} must be an object.")
    missing = [k for k in CHANGE_KEYS if k not in doc]
    if missing:
        raise ValueError(f"history entry {number} lacks {', '.join(missing)}.")
    problem = None
    if not isinstance(doc["change_id"], str) or not 0 < len(doc["change_id"]) <= 36:
        problem = "change_id must be a string of 1-36 characters"
    elif not isinstance(doc["transition"], str) or not 0 < len(doc["transition"]) <= 64:
        problem = "transition must be a string of 1-64 characters"
    elif doc["actor"] is not None and (
        not isinstance(doc["actor"], str) or not 0 < len(doc["actor"]) <= 255
    ):
        problem = "actor must be a string of 1-255 characters or null"
    elif not isinstance(doc["metadata"], dict):
        problem = "metadata must be an object"
    elif any(doc[k] is not None and not isinstance(doc[k], dict) for k in ("old_data", "new_data")):
        problem = "old_data and new_data must be objects or null"
    if problem is not None:
        raise ValueError(f"history entry {number}: {problem}.")
    documents = {
        key: None
        if doc[key] is None
        else check_document(doc[key], f"history entry {number} {key}", max_depth=max_depth)[0]
        for key in ("old_data", "new_data", "metadata")
    }
    return Change(
        doc, **documents, created_at=_time(doc["created_at"], f"history entry {number} created_at")
    )


def _time(value: Any, field: str, *, optional: bool = False) -> Any:
    """An ISO-8601 timestamp with a time zone (``Z`` or an offset) as an aware UTC datetime."""
    if value is None and optional:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise ValueError(
            f"{field} must be an ISO-8601 timestamp with a time zone, like "
            f"'2024-05-01T12:00:00.000000Z', got {value!r}."
        )
    return parse_time(value)


def export_states(
    store: Store,
    out: IO[bytes],
    *,
    state_type: str | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> Summary:
    """Write every stored state of *store* (or of *state_type*) with its history to *out*.

    :param progress: called with the number of states written after each batch.
    """
    checksum = Checksum()
    changes = 0
    for batch in store.scan(state_type, BATCH_SIZE):
        for state in batch:
            # History only grows: entries committed after the record was read are
            # left out, so the line is the state and its history at one moment.
            version = state["version"]
            history = [c for c in store.history(state["state_id"]) if c["version"] <= version]
            line = encode(state, history)
            out.write(line + b"\n")
            checksum.add(state["state_id"], line)
            changes += len(history)
        progress(len(batch))
    return Summary(len(checksum), changes, checksum.hexdigest())


class PreparedImport:
    """An import file read and checked in full, spooled in canonical form, ready to restore.

    Made by :func:`prepare_import`; :attr:`states` and :attr:`checksum` describe
    the file, :meth:`restore` writes it.
    """

    def __init__(
        self,
        store: Store,
        spool: IO[bytes],
        lines_of: dict[str, int],
        checksum: Checksum,
        replace: bool,
    ) -> None:
        self._store = store
        self._replace = replace
        self._spool = spool
        self._lines_of = lines_of
        #: How many states the file holds.
        self.states = len(checksum)
        #: The file's :class:`Checksum` (what the export printed, if it is unchanged).
        self.checksum = checksum.hexdigest()

    def restore(self, progress: Callable[[int], None] = lambda n: None) -> Summary:
        """Restore every state (each with its history, all or nothing), then read it back.

        :param progress: called with the number of states restored, as they are.
        :raises TransferError: the store refused a state; the states before it
            are restored, the rest not.
        """
        store = self._store
        self._spool.seek(0)
        stored = Checksum()
        changes = 0
        for line in self._spool:
            document = orjson.loads(line)
            state = State.from_json(document["state"])
            history = [Change.from_json(c) for c in document["history"]]
            state_id = state["state_id"]
            try:
                store.restore(state, history, replace=self._replace)
            except StateManagerError as exc:
                raise TransferError(
                    f"{exc} Restored {len(stored)} of {self.states} states before this one "
                    "(each whole); run the import again with --replace to finish it.",
                    line=self._lines_of[state_id],
                ) from exc
            # Read back what the store now holds: its checksum proves the copy.
            restored = store.get(state_id)
            if restored is None:
                raise TransferError(f"State {state_id!r} was restored but reads as absent.")
            stored.add(state_id, encode(restored, store.history(state_id)))
            changes += len(history)
            progress(1)
        return Summary(self.states, changes, self.checksum, stored.hexdigest())


@contextmanager
def prepare_import(
    store: Store,
    lines: Iterable[bytes],
    check_type: Callable[[str], object],
    *,
    replace: bool = False,
    check_keys: Callable[[State, Sequence[Change]], object] | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Iterator[PreparedImport]:
    """Read and check every line of an export before anything is written.

    :param replace: states the store already holds will be overwritten; without
        it, such a state makes the whole file refused.
    :param check_keys: opens a state's encrypted values (and its history's)
        with this app's keys; a :class:`ConfigurationError` from it (no key
        opens them) refuses the file, naming the line.
    :param max_depth: the deepest nesting a document may have
        (``STATEMANAGER_MAX_DEPTH``).
    :raises TransferError: a malformed line, an id given twice, or (without
        *replace*) an id the store holds; nothing was written.
    """
    checksum = Checksum()
    lines_of: dict[str, int] = {}
    pending: list[str] = []
    with tempfile.TemporaryFile() as spool:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            state, history = decode(raw, number, check_type, max_depth)
            if check_keys is not None:
                try:
                    check_keys(state, history)
                except ConfigurationError as exc:
                    raise TransferError(
                        f"{exc} The file was exported with other keys: set "
                        "STATEMANAGER_ENCRYPTION_KEYS to include them; nothing was imported.",
                        line=number,
                    ) from None
            state_id = state["state_id"]
            if state_id in lines_of:
                raise TransferError(
                    f"state {state_id!r} was already given on line {lines_of[state_id]}.",
                    line=number,
                )
            lines_of[state_id] = number
            line = encode(state, history)
            checksum.add(state_id, line)
            spool.write(line + b"\n")
            if not replace:
                pending.append(state_id)
                if len(pending) >= BATCH_SIZE:
                    _refuse_stored(store, pending, lines_of)
        if pending:
            _refuse_stored(store, pending, lines_of)
        yield PreparedImport(store, spool, lines_of, checksum, replace)


def import_states(
    store: Store,
    lines: Iterable[bytes],
    check_type: Callable[[str], object],
    *,
    replace: bool = False,
    progress: Callable[[int], None] = lambda n: None,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Summary:
    """:func:`prepare_import` then :meth:`PreparedImport.restore`.

    :param max_depth: the app's ``STATEMANAGER_MAX_DEPTH``.
    """
    with prepare_import(store, lines, check_type, replace=replace, max_depth=max_depth) as prepared:
        return prepared.restore(progress)


def _refuse_stored(store: Store, pending: list[str], lines_of: dict[str, int]) -> None:
    found = store.stored_ids(pending)
    pending.clear()
    if found:
        first = min(found, key=lambda i: lines_of[i])
        raise TransferError(
            f"state {first!r} is already stored"
            + (f" (and {len(found) - 1} more in this batch)" if len(found) > 1 else "")
            + "; nothing was imported. Use --replace to overwrite stored states.",
            line=lines_of[first],
        )
