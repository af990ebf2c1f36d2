"""Retention: how much history each type keeps, and when deleted states go.

A type's history rules (``register_type(..., keep_history=N,
keep_history_for=seconds)``) and its grace period for deleted states
(``purge_deleted_after``, or ``STATEMANAGER_PURGE_DELETED_AFTER``) become a
:class:`~.stores.base.Retention` at the time of a run; :func:`prune` applies
it to every store through :meth:`~.stores.base.Store.prune`, a batch at a
time. Nothing is pruned implicitly: writes never trim history, only
``flask states prune`` (or :meth:`StateManager.prune`) does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .definitions import TypeDefinition
from .errors import ConfigurationError
from .stores.base import Pruned, Retention

if TYPE_CHECKING:
    from .config import Settings
    from .stores.base import Store


def check_count(name: str, value: Any) -> int | None:
    """Return *value* if ``None`` or a positive integer, else raise :class:`ConfigurationError`."""
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer or None, got {value!r}.")
    return value


def check_seconds(name: str, value: Any) -> float | None:
    """Return *value* seconds if ``None`` or a positive number, else raise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 10**10:
        raise ConfigurationError(
            f"{name} must be a positive number of seconds or None, got {value!r} "
            "(30 days is 30 * 86400)."
        )
    return float(value)


def retention_of(definition: TypeDefinition, settings: Settings, now: datetime) -> Retention:
    """The retention of *definition* for a run at *now*."""
    purge_after = definition.purge_deleted_after
    if purge_after is None:
        purge_after = settings.purge_deleted_after
    return Retention(
        keep_last=definition.keep_history,
        keep_since=(
            None
            if definition.keep_history_for is None
            else now - timedelta(seconds=definition.keep_history_for)
        ),
        purge_before=None if purge_after is None else now - timedelta(seconds=purge_after),
    )


@dataclass
class PruneReport:
    """What :func:`prune` did (or, in a dry run, would do), in total and per type.

    :param states: states examined.
    :param entries: history entries removed, those of purged states included.
    :param purged: deleted states removed whole.
    """

    states: int = 0
    entries: int = 0
    purged: int = 0
    dry_run: bool = False
    #: ``{type: (entries, purged)}`` for each type that had something to remove.
    types: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add(self, type_name: str, batch: Pruned) -> None:
        self.states += batch.states
        self.entries += batch.entries
        self.purged += len(batch.purged)
        if batch.entries or batch.purged:
            entries, purged = self.types.get(type_name, (0, 0))
            self.types[type_name] = (entries + batch.entries, purged + len(batch.purged))


def prune(
    store: Store,
    definitions: Iterable[TypeDefinition],
    settings: Settings,
    now: datetime,
    *,
    dry_run: bool = False,
    batch_size: int = 500,
    progress: Callable[[str, Pruned], None] | None = None,
) -> PruneReport:
    """Apply each type's retention to its stored states; types without one are skipped.

    :param progress: called after every batch with the type and what the batch did.
    """
    report = PruneReport(dry_run=dry_run)
    for definition in definitions:
        retention = retention_of(definition, settings, now)
        if not retention.trims_history and retention.purge_before is None:
            continue
        for batch in store.prune(
            definition.name, retention, batch_size=batch_size, dry_run=dry_run
        ):
            report.add(definition.name, batch)
            if progress is not None:
                progress(definition.name, batch)
    return report


def has_retention(definition: TypeDefinition, settings: Settings) -> bool:
    """Whether :func:`prune` has anything to apply to *definition*."""
    return (
        definition.keep_history is not None
        or definition.keep_history_for is not None
        or definition.purge_deleted_after is not None
        or settings.purge_deleted_after is not None
    )
