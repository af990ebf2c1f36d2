"""Each public write, turned into an engine :class:`~.engine.Operation`.

``register_state``, ``update_state`` and the others check their arguments here
and describe the change they want; the engine applies it on the state as read
under the store's lock. Single calls, bulk calls and transactions share these
functions, so a change means the same thing however it is submitted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from . import codec
from .definitions import StateTransition, TransitionLike, TypeLike, normalize_transition
from .definitions import normalize_type as _normalize_type
from .engine import Operation, Proposal, Registry, check_state_id, check_ttl, parse_payload
from .errors import StateValidationError
from .records import State


def register(
    registry: Registry,
    state_id: str,
    state_type: TypeLike,
    initial_data: Mapping[str, Any],
    *,
    ttl: float | None = None,
    actor: str | None = None,
) -> Operation:
    """``register_state``: create a state."""
    type_name = _normalize_type(state_type)
    registry.type(type_name)
    proposal = parse_payload(initial_data, "initial_data", type_name)
    proposal.transition = StateTransition.CREATE.value
    proposal.ttl = check_ttl(ttl)
    if proposal.data is None:
        proposal.data = {}
    return Operation(
        check_state_id(state_id),
        lambda _: proposal,
        create_type=type_name,
        actor=actor,
        transition="create",
    )


def update(
    state_id: str,
    new_data: Mapping[str, Any],
    transition: TransitionLike = StateTransition.UPDATE,
    *,
    expected_version: int | str | None = None,
    ttl: float | None = None,
    actor: str | None = None,
) -> Operation:
    """``update_state``: replace ``data`` (and ``name``/``metadata``) with a transition."""
    proposal = parse_payload(new_data, "new_data", None)
    proposal.transition = normalize_transition(transition, known=None)
    proposal.ttl = check_ttl(ttl)
    given_type = new_data.get("type")

    def build(current: State | None) -> Proposal:
        assert current is not None
        if given_type is not None and getattr(given_type, "value", given_type) != current["type"]:
            raise StateValidationError(
                f"new_data['type'] is {given_type!r} but state {state_id!r} is of type "
                f"{current['type']!r}; remove it or make them match.",
                {"type": [f"Does not match {current['type']!r}."]},
            )
        return proposal

    return Operation(
        check_state_id(state_id),
        build,
        expected_version=version(expected_version),
        actor=actor,
        transition=proposal.transition,
    )


def patch(
    state_id: str,
    changes: Mapping[str, Any],
    *,
    expected_version: int | str | None = None,
    actor: str | None = None,
) -> Operation:
    """``patch_state``: a JSON merge patch (RFC 7386) of ``data``."""
    if not isinstance(changes, dict):
        raise StateValidationError(
            "changes must be a dict (a JSON merge patch of data).",
            {"changes": ["Must be a dict."]},
        )

    def build(current: State | None) -> Proposal:
        assert current is not None
        return Proposal("update", data=codec.merge_patch(current["data"], changes))

    return Operation(
        check_state_id(state_id), build, expected_version=version(expected_version), actor=actor
    )


def transition(
    state_id: str,
    transition: TransitionLike,
    *,
    data: Mapping[str, Any] | None = None,
    expected_version: int | str | None = None,
    actor: str | None = None,
) -> Operation:
    """``transition``: a lifecycle transition, optionally replacing ``data``."""
    name = normalize_transition(transition, known=None)
    if data is not None and not isinstance(data, Mapping):
        raise StateValidationError(
            f"transition's data must be a dict (the new data), got {type(data).__name__}.",
            {"data": ["Must be a dict."]},
        )
    proposal = Proposal(name, data=None if data is None else dict(data))
    return Operation(
        check_state_id(state_id),
        lambda _: proposal,
        expected_version=version(expected_version),
        actor=actor,
        transition=name,
    )


def delete(
    state_id: str, *, expected_version: int | str | None = None, actor: str | None = None
) -> Operation:
    """``delete_state``: gone from reads, history kept."""
    return Operation(
        check_state_id(state_id),
        lambda _: Proposal("delete"),
        expected_version=version(expected_version),
        actor=actor,
        transition="delete",
    )


def compute(
    state_id: str,
    fn: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    actor: str | None = None,
) -> Operation:
    """``atomic_update``: new ``data`` computed from the current one."""

    def build(current: State | None) -> Proposal:
        assert current is not None
        result = fn(codec.loads(codec.dumps(current["data"])))
        if not isinstance(result, dict):
            raise StateValidationError(
                f"atomic_update's function must return the new data dict, got "
                f"{type(result).__name__}.",
                {"data": ["Must be a dict."]},
            )
        return Proposal("update", data=result)

    return Operation(check_state_id(state_id), build, actor=actor)


def version(value: int | str | None) -> int | None:
    """Accept a version or an etag (``"3"``, ``'"3"'`` or ``'W/"3"'``)."""
    if isinstance(value, str):
        stripped = value.strip().removeprefix("W/").strip('"')
        if not (stripped.isascii() and stripped.isdigit()):  # "²".isdigit() is true
            raise StateValidationError(
                f"expected_version {value!r} is not a version or etag.",
                {"expected_version": ["A version number or etag."]},
            )
        return int(stripped)
    return value
