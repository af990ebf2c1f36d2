"""State types, transitions and lifecycles: the definitions shared by every app.

A *type* names a family of states (``"user"``, ``"cart"``) with its lifecycle,
default TTL, schema and declared search indexes. A *lifecycle* maps each
transition to the statuses it may start from and the status it leads to.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeAlias

from .errors import ConfigurationError, InvalidTransitionError, StateValidationError


class StateType(StrEnum):
    """The built-in state types; their values are the lower-case names."""

    USER = "user"
    TRANSACTION = "transaction"
    SUBSCRIPTION = "subscription"
    FEATURE = "feature"
    SESSION = "session"


class StateTransition(StrEnum):
    """The built-in transitions; their values are the lower-case names."""

    CREATE = "create"
    UPDATE = "update"
    ACTIVATE = "activate"
    SUSPEND = "suspend"
    RESUME = "resume"
    EXPIRE = "expire"
    DELETE = "delete"


TypeLike: TypeAlias = "StateType | str"
TransitionLike: TypeAlias = "StateTransition | str"

#: Status of a deleted state: kept with its history, never returned by reads.
DELETED = "deleted"
#: Status a state gets when its TTL passes.
EXPIRED = "expired"

# Past tense used in callback event names ("user_suspended") and signal names.
_PAST_TENSE = {
    "create": "created",
    "update": "updated",
    "activate": "activated",
    "suspend": "suspended",
    "resume": "resumed",
    "expire": "expired",
    "delete": "deleted",
}

# \Z, not $: "$" also matches before a trailing newline ("cart\n").
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")
_FIELD_RE = re.compile(r"^(data|metadata)(\.[A-Za-z0-9_]{1,64}){1,8}\Z")


def event_name(transition: str) -> str:
    """The past-tense event word of a transition (``suspend`` → ``suspended``).

    Custom transitions keep their own name.
    """
    return _PAST_TENSE.get(transition, transition)


def normalize_type(value: TypeLike) -> str:
    """Return the type name of an enum member or string."""
    name = value.value if isinstance(value, StateType) else value
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise StateValidationError(
            f"State type must be a lower-case name like 'user' or a StateType member, "
            f"got {value!r}.",
            {"type": ["Invalid type name."]},
        )
    return name


def normalize_transition(value: TransitionLike, known: Iterable[str] | None) -> str:
    """Return the transition name of an enum member or string.

    :param known: when given, names outside it raise :class:`InvalidTransitionError`.
    """
    if type(value) is StateTransition and known is None:
        return value.value  # lower-case names by definition
    name = value.value if isinstance(value, StateTransition) else value
    if not isinstance(name, str) or not _NAME_RE.match(name.lower()):
        raise InvalidTransitionError(
            f"A transition must be a StateTransition member or a name like 'suspend', "
            f"got {value!r}.",
            transition=str(value),
        )
    name = name.lower()
    if known is not None and name not in set(known):
        raise InvalidTransitionError(
            f"Unknown transition {name!r}; use one of: {', '.join(sorted(known))}.",
            transition=name,
            allowed=sorted(known),
        )
    return name


def check_field_path(path: str) -> None:
    """Raise unless *path* is a plain dotted path into ``data`` or ``metadata``."""
    if not isinstance(path, str) or not _FIELD_RE.match(path):
        raise ConfigurationError(
            f"Field {path!r} must be a dotted path like 'data.status' "
            "(letters, digits and underscores, at most 8 levels)."
        )


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of a lifecycle table.

    :param sources: statuses the transition may start from; ``None`` means any
        status, an empty set means "no state yet" (creation).
    :param target: the status after the transition; ``None`` keeps the status.
    """

    sources: frozenset[str] | None
    target: str | None

    def allows(self, status: str | None) -> bool:
        if status is None:
            return self.sources is not None and not self.sources
        return self.sources is None or status in self.sources


#: ``{transition: (from statuses, to status)}``; ``None`` as *from* means
#: creation, ``"*"`` any status; ``None`` as *to* keeps the status.
LifecycleTable: TypeAlias = Mapping[str, tuple[Any, str | None]]

DEFAULT_LIFECYCLE_TABLE: LifecycleTable = {
    "create": (None, "pending"),
    "update": (("pending", "active", "suspended"), None),
    "activate": (("pending", "suspended"), "active"),
    "suspend": (("active",), "suspended"),
    "resume": (("suspended",), "active"),
    "expire": (("pending", "active", "suspended"), EXPIRED),
    "delete": ("*", DELETED),
}


class Lifecycle:
    """Validated transitions of one type: which statuses each transition leaves and reaches."""

    __slots__ = ("rules",)

    def __init__(self, table: LifecycleTable) -> None:
        rules: dict[str, Rule] = {}
        for raw_name, (sources, target) in table.items():
            name = normalize_transition(raw_name, known=None)
            if sources is None:
                src: frozenset[str] | None = frozenset()
            elif sources == "*":
                src = None
            elif isinstance(sources, str):
                src = frozenset([sources])
            else:
                src = frozenset(sources)
            rules[name] = Rule(src, target)
        create = rules.get("create")
        if create is None or create.sources != frozenset() or not create.target:
            raise ConfigurationError(
                "A lifecycle needs a 'create' transition from None to a status, e.g. "
                "{'create': (None, 'new'), ...}."
            )
        # Deleting is always possible; a table may still restrict it.
        rules.setdefault("delete", Rule(None, DELETED))
        self.rules = rules

    def rule(self, transition: str, status: str | None, type_name: str) -> Rule:
        """The rule for *transition* from *status*.

        :raises InvalidTransitionError: unknown, or not allowed from *status*.
        """
        rule = self.rules.get(transition)
        if rule is None:
            raise InvalidTransitionError(
                f"Unknown transition {transition!r} for type {type_name!r}; "
                f"use one of: {', '.join(sorted(self.rules))}.",
                transition=transition,
                status=status,
                allowed=sorted(self.rules),
            )
        if not rule.allows(status):
            allowed = self.allowed_from(status)
            where = "a new state" if status is None else f"status {status!r}"
            raise InvalidTransitionError(
                f"Transition {transition!r} is not allowed from {where} of type {type_name!r}; "
                f"allowed: {', '.join(allowed) or 'none'}.",
                transition=transition,
                status=status,
                allowed=allowed,
            )
        return rule

    def allowed_from(self, status: str | None) -> list[str]:
        """The transitions allowed from *status*, sorted."""
        return sorted(name for name, rule in self.rules.items() if rule.allows(status))

    @property
    def statuses(self) -> list[str]:
        """Every status this lifecycle can reach, sorted."""
        found = {r.target for r in self.rules.values() if r.target}
        for r in self.rules.values():
            found.update(r.sources or ())
        return sorted(found)


DEFAULT_LIFECYCLE = Lifecycle(DEFAULT_LIFECYCLE_TABLE)


@dataclass(frozen=True, slots=True)
class TypeDefinition:
    """Everything the manager knows about one state type.

    :param name: the type name (``"user"``).
    :param lifecycle: its transitions and statuses.
    :param default_ttl: seconds a new state lives unless given a ``ttl``.
    :param indexes: dotted fields declared for search indexes.
    :param encrypted_fields: dotted fields stored encrypted (:mod:`.encryption`).
    :param keep_history: ``flask states prune`` keeps at least this many of
        each state's newest history entries.
    :param keep_history_for: ``prune`` keeps every entry younger than this
        many seconds.
    :param purge_deleted_after: ``prune`` removes deleted states (tombstone
        and history) this many seconds after their deletion; ``None`` defers
        to ``STATEMANAGER_PURGE_DELETED_AFTER``.
    :param max_states: most live states the type may hold; ``None`` defers to
        ``STATEMANAGER_MAX_STATES_PER_TYPE``.
    """

    name: str
    lifecycle: Lifecycle = DEFAULT_LIFECYCLE
    default_ttl: float | None = None
    indexes: tuple[str, ...] = ()
    keep_history: int | None = None
    keep_history_for: float | None = None
    purge_deleted_after: float | None = None
    max_states: int | None = None
    #: The type's own schema (a :class:`~.validation.Validator`), run before
    #: validators registered with ``register_validator``.
    validator: Any = None
    encrypted_fields: tuple[str, ...] = ()


def builtin_types() -> dict[str, TypeDefinition]:
    """Fresh definitions of the built-in types."""
    return {member.value: TypeDefinition(member.value) for member in StateType}
