"""JSON: the one place documents are checked, encoded and decoded.

Stores share :func:`dumps` / :func:`loads` (orjson). :func:`check_document`
enforces the JSON data model strictly before anything is written: ``str``,
``int`` (64-bit), finite ``float``, ``bool``, ``None``, ``list`` and ``dict``
with string keys; orjson alone would quietly accept datetimes or turn NaN into
``null``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson

from .errors import StateLimitError, StateValidationError

_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
#: ``STATEMANAGER_MAX_DEPTH``'s default: the deepest nesting a document may have.
DEFAULT_MAX_DEPTH = 32
_NUL_PROBLEM = "contains a NUL character (\\x00), which databases cannot store"


def dumps(value: Any) -> bytes:
    """Encode a checked JSON document."""
    return orjson.dumps(value)


def dumps_record(record: Any, stamp: Callable[[datetime], str]) -> bytes:
    """Encode a record whose datetimes (its timestamps) *stamp* turns into text."""
    return orjson.dumps(record, default=stamp, option=orjson.OPT_PASSTHROUGH_DATETIME)


def dumps_utc(record: Any) -> bytes:
    """Encode a record whose datetimes are all UTC, as ISO-8601 ending in ``Z``
    (microseconds written when not 0)."""
    return orjson.dumps(record, option=orjson.OPT_UTC_Z)


def dumps_str(value: Any, *, lenient: bool = False) -> str:
    """Encode a checked JSON document as ``str``.

    :param lenient: render values JSON lacks (datetimes, exceptions) with
        ``str`` instead of failing; for logs, never for stored documents.
    """
    return orjson.dumps(value, default=str if lenient else None).decode()


loads = orjson.loads


#: What the encoding of a document that :func:`_canonical_numbers` may change
#: holds: a number written with an exponent, or negative zero.
_NUMBER_TO_FIX = re.compile(rb"[0-9]e|-0\.0")


def _canonical_numbers(value: Any, path: str) -> Any:
    """*value* with every float as PostgreSQL's ``jsonb`` gives it back.

    ``jsonb`` keeps numbers as decimals: ``-0.0`` comes back as ``0.0``, and a
    float of 1e16 or more (always integral) as an integer. Writing them so in
    the first place makes every store, the Redis cache and an export agree.
    """
    kind = type(value)
    if kind is float:
        if value == 0.0:
            return 0.0
        if abs(value) >= 1e16 and value.is_integer():
            if abs(value) < 2**63:
                return int(value)
            if abs(value) < 2**64:
                raise StateValidationError(
                    f"Not storable exactly: {path}: {value!r} comes back from PostgreSQL as an "
                    "integer beyond 64 bits; store it as a string.",
                    {path: ["Store it as a string."]},
                )
        return value
    if kind is dict:
        return {k: _canonical_numbers(v, f"{path}.{k}") for k, v in value.items()}
    if kind is list:
        return [_canonical_numbers(v, f"{path}[{n}]") for n, v in enumerate(value)]
    return value


class _TooDeep(Exception):
    """Nesting past the limit, at :attr:`where` (filled in on the way out)."""

    where = ""


def _problem(value: Any, depth: int, max_depth: int) -> str | None:
    """Describe the first non-JSON value under *value*, or return ``None``.

    The description starts with the path below *value* (``.key[0]: …``): it
    is put together on the way out, so a valid document builds no paths.

    :raises _TooDeep: nesting exceeds *max_depth*.
    """
    kind = type(value)
    if kind is str:
        return f": {_NUL_PROBLEM}" if "\x00" in value else None
    if value is None or kind is bool:
        return None
    if kind is int:
        if _INT_MIN <= value <= _INT_MAX:
            return None
        return f": integer {value} does not fit in 64 bits; store it as a string"
    if kind is float:
        if math.isfinite(value):
            return None
        return f": {value} is not a JSON number; use null or a string"
    if kind is dict or kind is list:
        if depth >= max_depth:
            raise _TooDeep
        items = value.items() if kind is dict else enumerate(value)
        key: Any
        for key, item in items:
            if kind is dict and type(key) is not str:
                return f": key {key!r} is not a string; JSON object keys are strings"
            if kind is dict and "\x00" in key:
                return f": key {key!r}: {_NUL_PROBLEM}"
            try:
                found = _problem(item, depth + 1, max_depth)
            except _TooDeep as exc:
                exc.where = (f".{key}" if kind is dict else f"[{key}]") + exc.where
                raise
            if found:
                return (f".{key}" if kind is dict else f"[{key}]") + found
        return None
    return f": {kind.__name__} is not a JSON value; use str, int, float, bool, None, list or dict"


def check_text(value: Any, field: str, *, max_length: int = 255) -> str:
    """Return *value* if it is storable text of 1 to *max_length* characters, else raise."""
    problem = None
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        problem = f"must be a string of 1-{max_length} characters"
    elif "\x00" in value:
        problem = _NUL_PROBLEM
    else:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            problem = "must be valid Unicode text (no lone surrogates)"
    if problem is not None:
        raise StateValidationError(f"{field} {problem}.", {field: [problem]})
    return value  # type: ignore[no-any-return]


def check_document(value: Any, field: str, *, max_depth: int) -> tuple[Any, int]:
    """Check that *value* is a JSON object within the nesting limit.

    Returns the document with its numbers as every store gives them back (see
    :func:`_canonical_number`; *value* itself when nothing changes, the common
    case) and its encoded size.

    :raises StateValidationError: not a ``dict`` or holds a non-JSON value.
    :raises StateLimitError: nested deeper than *max_depth*.
    """
    if type(value) is not dict:
        raise StateValidationError(
            f"{field!r} must be a JSON object (dict), got {type(value).__name__}.",
            {field: ["Must be a JSON object."]},
        )
    try:
        problem = _problem(value, 0, max_depth)
    except _TooDeep as exc:
        raise StateLimitError(
            f"{field}{exc.where}: nested deeper than {max_depth} levels; flatten the document or "
            "raise STATEMANAGER_MAX_DEPTH.",
            limit="depth",
            value=max_depth + 1,
            maximum=max_depth,
        ) from None
    if problem is not None:
        problem = field + problem
        raise StateValidationError(f"Not JSON-serialisable: {problem}.", {field: [problem]})
    try:
        encoded = orjson.dumps(value)
        if _NUMBER_TO_FIX.search(encoded):  # rare: an exponent, or -0.0 (or such text)
            value = _canonical_numbers(value, field)
            encoded = orjson.dumps(value)
        return value, len(encoded)
    except orjson.JSONEncodeError as exc:  # e.g. a lone surrogate in a string
        raise StateValidationError(
            f"Not JSON-serialisable: {field}: {exc}; strings must be valid Unicode text.",
            {field: [str(exc)]},
        ) from None


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply a JSON merge patch (RFC 7386): ``None`` removes a key, objects merge."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
