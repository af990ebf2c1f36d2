"""The ``flask states`` command group."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from flask.cli import with_appcontext

from . import codec
from .errors import StateManagerError

if TYPE_CHECKING:
    from .extension import StateManager


def _manager() -> StateManager:
    from .extension import StateManager

    return StateManager()


@click.group("states", help="Inspect and maintain flask-statemanager states.")
def states() -> None:
    pass


@states.command("init-db")
@with_appcontext
def init_db() -> None:
    """Create the states and history tables and every declared index (idempotent)."""
    manager = _manager()
    try:
        manager.create_all()
    except StateManagerError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Tables and indexes ready ({manager.store.kind} store).")


@states.command("show")
@click.argument("state_id")
@with_appcontext
def show(state_id: str) -> None:
    """Print one state as JSON."""
    try:
        state = _manager().get_state(state_id, include_expired=True)
    except StateManagerError as exc:
        raise click.ClickException(str(exc)) from exc
    if state is None:
        raise click.ClickException(f"No state {state_id!r}.")
    click.echo(codec.dumps_str(state.to_json()))


@states.command("history")
@click.argument("state_id")
@with_appcontext
def history(state_id: str) -> None:
    """Print a state's history, oldest first, one JSON change per line."""
    try:
        changes = _manager().get_state_history(state_id)
    except StateManagerError as exc:
        raise click.ClickException(str(exc)) from exc
    for change in changes:
        click.echo(codec.dumps_str(change.to_json()))


@states.command("sweep")
@click.option(
    "--limit",
    default=1000,
    show_default=True,
    type=click.IntRange(1),
    help="Most states to expire in this run.",
)
@with_appcontext
def sweep(limit: int) -> None:
    """Record the EXPIRE change of states whose TTL passed (actor 'ttl')."""
    try:
        count = _manager().sweep_expired(limit=limit)
    except StateManagerError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Expired {count} state(s).")


@states.command("prune")
@click.option("--type", "state_type", default=None, help="Only this state type.")
@click.option("--dry-run", is_flag=True, help="Count what would be removed; remove nothing.")
@click.option(
    "--batch-size",
    default=500,
    show_default=True,
    type=click.IntRange(1),
    help="States per batch; each batch commits on its own.",
)
@with_appcontext
def prune(state_type: str | None, dry_run: bool, batch_size: int) -> None:
    """Apply retention: trim old history entries and purge old deleted states.

    Each type keeps what register_type(..., keep_history=N, keep_history_for=
    seconds) says; deleted states go purge_deleted_after seconds (or
    STATEMANAGER_PURGE_DELETED_AFTER) after their deletion. A state's newest
    history entry always stays.
    """
    from .retention import has_retention

    manager = _manager()
    try:
        if state_type is not None:
            types = [manager.get_type(state_type)]
        else:
            types = list(manager.types.values())
        settings = manager._runtime().settings
        total = sum(manager.store.type_size(t.name) for t in types if has_retention(t, settings))
        with click.progressbar(length=total, label="Pruning") as bar:
            report = manager.prune(
                state_type,
                dry_run=dry_run,
                batch_size=batch_size,
                progress=lambda _type, batch: bar.update(batch.states),
            )
    except StateManagerError as exc:
        raise click.ClickException(str(exc)) from exc
    verb = "Would remove" if dry_run else "Removed"
    for name, (entries, purged) in sorted(report.types.items()):
        click.echo(f"  {name}: {entries} history entries, {purged} deleted state(s)")
    click.echo(
        f"{verb} {report.entries} history entries and purged {report.purged} deleted state(s) "
        f"of {report.states} examined."
    )
