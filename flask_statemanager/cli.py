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


@states.command("rotate-keys")
@click.option(
    "--batch-size",
    default=500,
    show_default=True,
    type=click.IntRange(1),
    help="States (or rows) read and rewritten per batch.",
)
@with_appcontext
def rotate_keys(batch_size: int) -> None:
    """Re-encrypt every encrypted field, in states and history, with the first key.

    Put the new key first in STATEMANAGER_ENCRYPTION_KEYS, keep the old ones
    after it, run this, then remove the old keys. Versions and history stay as
    they are. Safe to run again after an interruption.
    """
    try:
        total, batches, counts = _manager().rotate_encryption_keys(batch_size=batch_size)
        with click.progressbar(length=total, label="Re-encrypting") as bar:
            for done in batches:
                bar.update(done)
    except StateManagerError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"Re-encrypted {counts['states']} state(s) and {counts['changes']} history entr"
        f"{'y' if counts['changes'] == 1 else 'ies'} with the first key."
    )


@states.command("migrate")
@click.option("--type", "state_type", help="Only this type (default: every type with migrations).")
@click.option(
    "--batch-size",
    default=500,
    show_default=True,
    type=click.IntRange(1),
    help="States read and written per batch (one commit each).",
)
@with_appcontext
def migrate(state_type: str | None, batch_size: int) -> None:
    """Upgrade stored states to their type's newest data schema version.

    Each upgrade is written as an 'update' change with actor 'migration'.
    States already at the newest version are skipped, so an interrupted run
    continues where it stopped when started again.
    """
    try:
        run = _manager().migrate_states(state_type, batch_size=batch_size)
        with click.progressbar(length=run.total, label="Migrating") as bar:
            for done in run.batches:
                bar.update(done)
    except StateManagerError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Upgraded {run.upgraded} state(s); {run.current} already at the newest version.")
