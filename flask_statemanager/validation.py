"""Validators: plain callables and marshmallow schemas behind one interface.

A validator sees the candidate state (a mapping with ``name``, ``type``,
``status``, ``data`` and ``metadata``) before anything is written:

* a callable returning ``False`` (or raising :class:`StateValidationError`)
  rejects it; one that accepts a second argument is a *transition guard* and
  also receives the transition name;
* a marshmallow ``Schema`` class or instance is applied to ``data``; its error
  messages reach :attr:`StateValidationError.messages`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from marshmallow import Schema

from .errors import StateValidationError

ValidatorLike = Callable[..., Any] | Schema | type[Schema]


class Validator:
    """A registered validator, normalised so the engine calls them all alike."""

    __slots__ = ("target", "schema", "is_guard", "transitions", "label")

    def __init__(self, target: ValidatorLike, transitions: frozenset[str] | None = None) -> None:
        self.transitions = transitions
        self.schema: Schema | None = None
        self.is_guard = False
        if isinstance(target, type) and issubclass(target, Schema):
            self.schema = target()
        elif isinstance(target, Schema):
            self.schema = target
        elif callable(target):
            self.is_guard = _takes_two_arguments(target)
        else:
            raise TypeError(
                f"A validator must be a callable or a marshmallow Schema, got {target!r}."
            )
        self.target = target
        self.label = getattr(target, "__qualname__", None) or type(target).__name__

    def applies_to(self, transition: str, data_changed: bool) -> bool:
        """Guards run on their transitions; data validators run whenever data changes."""
        if self.transitions is not None and transition not in self.transitions:
            return False
        return self.is_guard or data_changed

    def __call__(self, candidate: Mapping[str, Any], transition: str) -> None:
        """Raise :class:`StateValidationError` if *candidate* is rejected."""
        if self.schema is not None:
            errors = self.schema.validate(candidate["data"])
            if errors:
                raise StateValidationError(
                    f"State data failed {self.label} validation: {errors}.", {"data": errors}
                )
            return
        fn: Callable[..., Any] = self.target  # type: ignore[assignment]
        result = fn(candidate, transition) if self.is_guard else fn(candidate)
        if result is False:
            kind = f"transition guard for {transition!r}" if self.is_guard else "validator"
            raise StateValidationError(
                f"State {candidate.get('state_id')!r} was rejected by {kind} {self.label}; "
                "fix the data it checks.",
                {"_state": [f"Rejected by {self.label}."]},
            )


def _takes_two_arguments(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)
