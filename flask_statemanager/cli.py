"""The ``flask states`` command group."""

from __future__ import annotations

import io
import sys
from typing import TYPE_CHECKING

import click
from flask.cli import with_appcontext

from . import codec
from .errors import StateManagerError

if TYPE_CHECKING:
    from .extension import StateManager
    from .stores.sql import SQLStore


def _manager() -> StateManager:
    from .extension import StateManager

    return StateManager()


@click.group("states", help="Inspect and maintain flask-statemanager states.")
def states() -> None:
    pass


@states.command("init-db")
@with_appcontext
def init_db() -> None:
    """Create or upgrade the tables (Alembic migrations), then every declared index.

    Idempotent. Declared indexes come from ``register_type(indexes=...)``, so
    they are created here and not by the migrations.
    """
    manager = _manager()
    try:
        manager.create_all()
        sql = _sql_store(manager)
        revision = sql.schema_revision() if sql is not None else None
    except StateManagerError as exc:
        raise click.ClickException(str(exc)) from exc
    if revision is not None:
        click.echo(f"Tables at revision {revision}.")
    click.echo(f"Tables and indexes ready ({manager.store.kind} store).")


@states.command("upgrade-db")
@click.option(
    "--sql", "show_sql", is_flag=True, help="Print the SQL of the upgrade instead of running it."
)
@with_appcontext
def upgrade_db(show_sql: bool) -> None:
    """Upgrade the states and history tables to the newest migration.

    Shows the revision found and the newest one. Tables made before migrations
    existed are recognised and stamped, not re-created. Declared field indexes
    are made by ``flask states init-db``.
    """
    manager = _manager()
    sql = _sql_store(manager)
    if sql is None:
        click.echo(f"The {manager.store.kind} store has no SQL tables: nothing to upgrade.")
        return
    output = io.StringIO() if show_sql else None
    try:
        result = sql.upgrade_schema(sql=output)
    except StateManagerError as exc:
        raise click.ClickException(str(exc)) from exc
    if output is not None:
        click.echo(output.getvalue().rstrip() or f"-- Already at revision {result.after}.")
        return
    if result.adopted:
        click.echo(f"Found tables made before migrations: stamped at revision {result.before}.")
    before = result.before or "none"
    if before == result.after:
        click.echo(f"Already at the newest revision, {result.after}.")
    else:
        click.echo(f"Upgraded the tables: {before} -> {result.after}.")


def _sql_store(manager: StateManager) -> SQLStore | None:
    """The app's SQL store, also when a Redis cache is in front of it; else ``None``."""
    from .stores.sql import SQLStore

    store = getattr(manager.store, "inner", manager.store)
    return store if isinstance(store, SQLStore) else None


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


def _state_id_of(item: object) -> str | None:
    return item if isinstance(item, str) else None


@states.command("verify")
@click.argument("state_id", required=False)
@with_appcontext
def verify(state_id: str | None) -> None:
    """Check the tamper-evident hash chain of every state's history (or of STATE_ID).

    Prints each broken chain, naming its first bad entry, and exits with
    status 1 if there is any.
    """
    manager = _manager()
    checked = 0
    broken: list[str] = []
    try:
        with click.progressbar(
            manager.verify_history(state_id),
            label="Verifying history",
            file=sys.stderr,
            item_show_func=_state_id_of,
        ) as results:
            for result in results:
                checked += 1
                if not isinstance(result, str):
                    broken.append(str(result))
    except StateManagerError as exc:
        raise click.ClickException(str(exc)) from exc
    for line in broken:
        click.echo(f"BROKEN {line}")
    if broken:
        raise click.ClickException(f"{len(broken)} of {checked} state histories fail to verify.")
    click.echo(f"History intact: {checked} state(s) verified.")
