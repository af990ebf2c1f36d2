"""Encryption at rest of named fields (``register_type(..., encrypted_fields=[...])``).

A type names dotted paths under ``data`` or ``metadata`` (``"data.ssn"``,
``"data.card.number"``). Their values are encrypted with Fernet
(``cryptography``'s AES-128-CBC + HMAC-SHA256 tokens) using the keys of
``STATEMANAGER_ENCRYPTION_KEYS``: the first key encrypts, every key decrypts
(:class:`cryptography.fernet.MultiFernet`), so keys rotate by putting a new
key first and running ``flask states rotate-keys``.

The engine does it in exactly two places, so no store knows about it:

* :meth:`Encryption.seal_write` is the last step before a write goes to the
  store: the state's fields, and the same fields in the history entry's
  ``old_data``/``new_data``, become tokens. Everything before it (validation,
  history, hashing, signals, callbacks) sees plaintext.
* :meth:`Encryption.open_state` / :meth:`Encryption.open_change` are the first
  step after a read, in the engine's plan and in every read operation.

A stored encrypted value is the string ``"fernet:<token>"``, the token
encrypting the value's JSON, so any JSON value (a string, a number, an
object) can be encrypted and comes back with its type. Decryption looks at the
paths every registered type declares and opens only values carrying the
prefix, so history entries (which do not name their type) decrypt too, and
values stored before a field was declared are returned as they are until
``rotate-keys`` (or the next write) encrypts them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from . import codec
from .definitions import TypeDefinition, check_field_path
from .errors import ConfigurationError, StateValidationError
from .query import Condition, Order, Query
from .records import Change, State, utcnow
from .stores.base import Store, Write

logger = logging.getLogger("flask_statemanager")

#: What starts every encrypted value in a stored document.
MARKER = "fernet:"
_KEYS = "STATEMANAGER_ENCRYPTION_KEYS"

Path = tuple[str, ...]


def check_encrypted_fields(fields: Iterable[str], indexes: Iterable[str]) -> tuple[str, ...]:
    """Validate a type's ``encrypted_fields`` against its ``indexes``; return them, deduplicated.

    :raises ConfigurationError: a path is malformed, is ``metadata.version``,
        lies inside another encrypted path, or overlaps a declared index.
    """
    if isinstance(fields, str):
        raise ConfigurationError(
            f"encrypted_fields takes a list of paths like ['data.ssn'], not one string {fields!r}."
        )
    checked = tuple(dict.fromkeys(fields))
    for field in checked:
        check_field_path(field)
        if field == "metadata.version" or field == "metadata":
            raise ConfigurationError(
                "metadata.version is the schema version data migrations read; it cannot be "
                "encrypted."
            )
    for n, field in enumerate(checked):
        for other in checked[n + 1 :]:
            if _overlaps(_path(field), _path(other)):
                inner, outer = sorted((field, other), key=len, reverse=True)
                raise ConfigurationError(
                    f"encrypted_fields lists {inner!r} inside {outer!r}: encrypting {outer!r} "
                    f"already covers it; list only {outer!r}."
                )
    for index in indexes:
        for field in checked:
            if _overlaps(_path(index), _path(field)):
                raise ConfigurationError(
                    f"Cannot index {index!r}: {field!r} is encrypted, so the database holds only "
                    "ciphertext there. Index another field, or drop it from encrypted_fields."
                )
    return checked


class Cipher:
    """Encrypts and decrypts single JSON values with a :class:`MultiFernet`."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        try:
            from cryptography.fernet import Fernet, InvalidToken, MultiFernet
        except ImportError:
            raise ConfigurationError(
                f"{_KEYS} needs cryptography: pip install 'flask-statemanager[crypto]'."
            ) from None
        self._fernet = MultiFernet([Fernet(key) for key in keys])
        self._invalid = InvalidToken

    def encrypt(self, value: Any) -> str:
        """``"fernet:<token>"`` for any JSON value, encrypted with the first key."""
        return MARKER + self._fernet.encrypt(codec.dumps(value)).decode("ascii")

    def decrypt(self, stored: str, where: str) -> Any:
        """The value inside ``"fernet:<token>"``.

        :param where: names the value in the error (``"data.ssn of state 'u1'"``).
        :raises ConfigurationError: no configured key opens it.
        """
        try:
            return codec.loads(self._fernet.decrypt(stored[len(MARKER) :].encode("ascii")))
        except (self._invalid, UnicodeEncodeError, ValueError):
            raise ConfigurationError(
                f"Cannot decrypt {where}: no key in {_KEYS} opens it (a wrong or removed key). "
                "Put back the key it was encrypted with; keep old keys after new ones until "
                "`flask states rotate-keys` has run."
            ) from None

    def rotate(self, stored: str, where: str) -> str:
        """The same value encrypted again with the first key."""
        try:
            token = self._fernet.rotate(stored[len(MARKER) :].encode("ascii"))
        except (self._invalid, UnicodeEncodeError, ValueError):
            self.decrypt(stored, where)  # raises the explanatory error
            raise
        return MARKER + token.decode("ascii")


class Encryption:
    """The encrypted fields of the registered types, with one app's keys.

    :param cipher: ``None`` when no keys are configured: then only types
        without encrypted fields may be written.
    :param types: the registry's type definitions (read at each call, so types
        registered later count).
    """

    def __init__(self, cipher: Cipher | None, types: Mapping[str, TypeDefinition]) -> None:
        self.cipher = cipher
        self._types = types
        #: fields() of a type, and of every type, with the definitions they came from:
        #: every write and read asks, and definitions rarely change.
        self._of_type: dict[str, tuple[TypeDefinition, tuple[Path, ...]]] = {}
        self._of_all: tuple[tuple[TypeDefinition, ...], tuple[Path, ...]] = ((), ())

    # -- which fields ---------------------------------------------------------------

    def fields(self, type_name: str | None) -> tuple[Path, ...]:
        """The encrypted paths of a type, or of every type when *type_name* is ``None``."""
        if type_name is not None:
            definition = self._types.get(type_name)
            if definition is None:
                return ()
            known = self._of_type.get(type_name)
            if known is None or known[0] is not definition:
                known = (definition, tuple(_path(f) for f in definition.encrypted_fields))
                self._of_type[type_name] = known
            return known[1]
        definitions = tuple(self._types.values())
        known_all = self._of_all
        if definitions != known_all[0]:  # compares by identity first: cheap when unchanged
            found: dict[Path, None] = {}
            for definition in definitions:
                for field in definition.encrypted_fields:
                    found[_path(field)] = None
            known_all = self._of_all = (definitions, tuple(found))
        return known_all[1]

    def _need_cipher(self, type_name: str) -> Cipher:
        if self.cipher is None:
            raise ConfigurationError(
                f"Type {type_name!r} has encrypted_fields but {_KEYS} is not set; set it to a "
                "list of Fernet keys (the first encrypts, all decrypt)."
            )
        return self.cipher

    def check_startup(self) -> None:
        """Raise if a registered type declares encrypted fields and no key is configured."""
        for name, definition in list(self._types.items()):
            if definition.encrypted_fields:
                self._need_cipher(name)

    def check_stored(self, store: Store, sample: int = 10) -> None:
        """Prove at start-up that the keys open what is stored.

        For each type with encrypted fields, the *sample* most recently and
        least recently updated live states are read (two indexed, paged
        queries per type, as ``get_states_by_type`` runs them) and their
        encrypted values decrypted: the newest were written with the current
        first key, the oldest are the likeliest to hold a key since removed. A
        store that cannot be read yet (no tables before ``flask states
        init-db``, a server down) is skipped with a warning; reads then fail
        later with the same :class:`ConfigurationError`.

        :raises ConfigurationError: no configured key opens a stored value.
        """
        for name, definition in list(self._types.items()):
            if not definition.encrypted_fields:
                continue
            for descending in (True, False):
                query = Query(name, (), Order("updated_at", (), descending), 0, sample, utcnow())
                try:
                    rows, _total = store.query(query)
                except Exception as exc:  # noqa: BLE001 - start-up must not need the database
                    logger.warning(
                        "Could not read stored %r states to check %s (%s); skipped.",
                        name,
                        _KEYS,
                        type(exc).__name__,
                    )
                    return
                for row in rows:
                    self.open_state(row)

    def check_conditions(self, type_name: str | None, conditions: Iterable[Condition]) -> None:
        """Refuse search filters on (or around) an encrypted field.

        :raises StateValidationError: a condition's path is an encrypted field,
            inside one, or an object holding one.
        """
        fields = self.fields(type_name)
        if not fields:
            return
        for condition in conditions:
            if not condition.is_json:
                continue
            path = (condition.root, *condition.path)
            for field in fields:
                if _overlaps(path, field):
                    name, secret = ".".join(path), ".".join(field)
                    raise StateValidationError(
                        f"Cannot filter on {name!r}: {secret!r} is an encrypted field, and the "
                        "database holds only its ciphertext. Filter on another field, or keep a "
                        "searchable non-secret copy (say, a keyed hash) in a field of its own.",
                        {name: ["Encrypted fields cannot be filtered on."]},
                    )

    # -- writes -------------------------------------------------------------------------

    def seal_write(self, write: Write) -> Write:
        """*write* with its state's and history entry's encrypted fields as ciphertext."""
        type_name = write.state["type"]
        fields = self.fields(type_name)
        if not fields:
            return write
        cipher = self._need_cipher(type_name)

        def seal(value: Any, _where: str) -> Any:
            return cipher.encrypt(value)

        state = _state_with(write.state, fields, seal)
        change = _change_with(write.change, fields, seal)
        return Write(state, write.expected_version, change, write.limit)

    # -- reads --------------------------------------------------------------------------

    def open_state(self, state: State) -> State:
        """*state* with every encrypted field decrypted (a copy; the input is left alone)."""
        fields = self.fields(None)
        if not fields:
            return state
        return _state_with(state, fields, self._opener(state["state_id"]))

    def open_change(self, change: Change) -> Change:
        """*change* with every encrypted field of ``old_data``/``new_data`` decrypted."""
        fields = self.fields(None)
        if not fields:
            return change
        return _change_with(change, fields, self._opener(change["state_id"]))

    def _opener(self, state_id: str) -> Callable[[Any, str], Any]:
        def open_value(value: Any, where: str) -> Any:
            if not (isinstance(value, str) and value.startswith(MARKER)):
                return value  # stored before the field was declared encrypted
            if self.cipher is None:
                raise ConfigurationError(
                    f"{where} of state {state_id!r} is encrypted but {_KEYS} is not set."
                )
            return self.cipher.decrypt(value, f"{where} of state {state_id!r}")

        return open_value

    # -- maintenance ---------------------------------------------------------------------

    def rotate_state(self, state: State) -> State | None:
        """*state* re-encrypted with the first key (plaintext at its type's fields encrypted),
        or ``None`` if it needs no rewrite."""
        rotated: State | None = self._rotate(
            state, self.fields(state["type"]), _state_with, state["state_id"]
        )
        return rotated

    def rotate_change(self, change: Change) -> Change | None:
        """*change* re-encrypted with the first key, or ``None`` if it needs no rewrite.

        History entries do not name their type: the paths of every type count.
        """
        rotated: Change | None = self._rotate(
            change, self.fields(None), _change_with, change["state_id"]
        )
        return rotated

    def _rotate(self, record: Any, fields: tuple[Path, ...], rebuild: Any, state_id: str) -> Any:
        if not fields or self.cipher is None:
            return None
        cipher = self.cipher
        changed = False

        def rotate(value: Any, where: str) -> Any:
            nonlocal changed
            changed = True
            if isinstance(value, str) and value.startswith(MARKER):
                return cipher.rotate(value, f"{where} of state {state_id!r}")
            return cipher.encrypt(value)

        result = rebuild(record, fields, rotate)
        return result if changed else None


def _path(field: str) -> Path:
    return tuple(field.split("."))


def _overlaps(a: Path, b: Path) -> bool:
    """One path is the other, or inside it."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


_ABSENT: Any = object()


def _get(doc: Any, path: Path) -> Any:
    for name in path:
        if not isinstance(doc, dict) or name not in doc:
            return _ABSENT
        doc = doc[name]
    return doc


def _replace(doc: Any, path: Path, fn: Callable[[Any, str], Any], where: str) -> Any:
    """*doc* with ``fn(value)`` at *path* (copied along the path), or *doc* if absent."""
    if not isinstance(doc, dict) or path[0] not in doc:
        return doc
    head, rest = path[0], path[1:]
    inner = doc[head]
    new = fn(inner, where) if not rest else _replace(inner, rest, fn, where)
    if new is inner:
        return doc
    return {**doc, head: new}


def _state_with(state: State, fields: Sequence[Path], fn: Callable[[Any, str], Any]) -> State:
    documents = {"data": state["data"], "metadata": state["metadata"]}
    for field in fields:
        root = field[0]
        if root in documents:
            documents[root] = _replace(documents[root], field[1:], fn, ".".join(field))
    if documents["data"] is state["data"] and documents["metadata"] is state["metadata"]:
        return state
    return State(state, **documents)


def _change_with(change: Change, fields: Sequence[Path], fn: Callable[[Any, str], Any]) -> Change:
    # old_data/new_data are the state's data objects: only data.* paths apply.
    old, new = change["old_data"], change["new_data"]
    for field in fields:
        if field[0] != "data":
            continue
        where = ".".join(field)
        if old is not None:
            old = _replace(old, field[1:], fn, f"old_data {where}")
        if new is not None:
            new = _replace(new, field[1:], fn, f"new_data {where}")
    if old is change["old_data"] and new is change["new_data"]:
        return change
    return Change(change, old_data=old, new_data=new)
