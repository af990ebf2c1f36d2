"""The ``flask states`` command group."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any, TextIO

import click
from flask import has_app_context
from flask.cli import ScriptInfo, with_appcontext

from . import codec
from .errors import StateManagerError, StateValidationError
from .query import Page, check_paging, parse_conditions, parse_order
from .records import isoformat
from .transfer import export_states, prepare_import

if TYPE_CHECKING:
    from .extension import StateManager
    from .stores.sql import SQLStore


def _manager() -> StateManager:
    from .extension import StateManager

    return StateManager()


@contextmanager
def _clear_errors() -> Iterator[None]:
    """Report the extension's errors as a one-line message and exit status 1."""
    try:
        yield
    except StateManagerError as exc:
        raise click.ClickException(str(exc)) from exc


def _batch_size(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The ``--batch-size`` option of the commands that walk the whole store."""
    return click.option(
        "--batch-size", default=500, show_default=True, type=click.IntRange(1), help=help
    )


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
    with _clear_errors():
        manager.create_all()
        sql = _sql_store(manager)
        revision = sql.schema_revision() if sql is not None else None
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
    with _clear_errors():
        result = sql.upgrade_schema(sql=output)
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
    with _clear_errors():
        state = _manager().get_state(state_id, include_expired=True)
    if state is None:
        raise click.ClickException(f"No state {state_id!r}.")
    click.echo(codec.dumps_str(state.to_json()))


@states.command("history")
@click.argument("state_id")
@with_appcontext
def history(state_id: str) -> None:
    """Print a state's history, oldest first, one JSON change per line."""
    with _clear_errors():
        changes = _manager().get_state_history(state_id)
    if not changes:
        raise click.ClickException(f"No history for state {state_id!r}: it was never registered.")
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
    with _clear_errors():
        count = _manager().sweep_expired(limit=limit)
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
    with _clear_errors():
        with click.progressbar(
            manager.verify_history(state_id),
            label="Verifying history",
            file=_stderr(),
            item_show_func=_state_id_of,
        ) as results:
            for result in results:
                checked += 1
                if not isinstance(result, str):
                    broken.append(str(result))
    for line in broken:
        click.echo(f"BROKEN {line}")
    if broken:
        raise click.ClickException(f"{len(broken)} of {checked} state histories fail to verify.")
    click.echo(f"History intact: {checked} state(s) verified.")


# -- listing and searching ------------------------------------------------------------


@contextmanager
def _usage_error(ctx: click.Context, param: click.Parameter) -> Iterator[None]:
    """Turn a :class:`StateManagerError` into a usage error of *param* (exit 2)."""
    try:
        yield
    except StateManagerError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def _known_type(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Option callback: *value* must name a registered state type; returns its name."""
    if value is None:
        return None
    with _usage_error(ctx, param):
        return _manager().get_type(value).name


def _parse_filters(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, Any]:
    """Argument callback: ``FIELD=VALUE`` pairs into a filters mapping.

    The value is read as JSON when it parses (``30``, ``true``, ``null``,
    ``["a", "b"]``, ``"007"``), else taken as a string (``active``).
    """
    filters: dict[str, Any] = {}
    for item in values:
        field, sep, raw = item.partition("=")
        if not sep or not field:
            raise click.BadParameter(
                f"{item!r} is not FIELD=VALUE; write e.g. data.status=active or data.age__gte=30.",
                ctx=ctx,
                param=param,
            )
        if field in filters:
            raise click.BadParameter(f"{field!r} is given twice.", ctx=ctx, param=param)
        try:
            filters[field] = codec.loads(raw)
        except ValueError:
            filters[field] = raw
    with _usage_error(ctx, param):
        parse_conditions(filters)
    return filters


def _check_order(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Option callback: *value* must be an order :func:`~.query.parse_order` accepts."""
    with _usage_error(ctx, param):
        parse_order(value)
    return value


def _check_paging(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """Option callback for ``--page`` and ``--per-page``: the limits searches enforce
    (:func:`~.query.check_paging`, ``STATEMANAGER_MAX_PER_PAGE``)."""
    with _clear_errors():
        if has_app_context():
            max_per_page = _manager()._runtime().settings.max_per_page
        else:  # callbacks run before with_appcontext pushes the command's context
            with ctx.ensure_object(ScriptInfo).load_app().app_context():
                max_per_page = _manager()._runtime().settings.max_per_page
    page, per_page = (value, 1) if param.name == "page" else (1, value)
    try:
        check_paging(page, per_page, max_per_page)
    except StateValidationError as exc:
        (problem,) = (problems[0] for problems in exc.messages.values())
        raise click.BadParameter(problem, ctx=ctx, param=param) from None
    return value


def _paging(command: Callable[..., Any]) -> Callable[..., Any]:
    """The paging and output options ``list`` and ``search`` share."""
    options = [
        click.option(
            "--page",
            default=1,
            show_default=True,
            type=click.IntRange(1),
            callback=_check_paging,
            help="Page number.",
        ),
        click.option(
            "--per-page",
            "--limit",
            "per_page",
            default=20,
            show_default=True,
            type=click.IntRange(1),
            callback=_check_paging,
            help="States per page (at most STATEMANAGER_MAX_PER_PAGE).",
        ),
        click.option(
            "--order-by",
            default="-updated_at",
            show_default=True,
            callback=_check_order,
            help="A record column (state_id, name, type, status, version, created_at, "
            "updated_at, expires_at); a leading '-' sorts descending.",
        ),
        click.option(
            "--json", "as_json", is_flag=True, help="One JSON record per line instead of a table."
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _print_page(page: Page, as_json: bool) -> None:
    if as_json:
        for state in page:
            click.echo(codec.dumps_str(state.to_json()))
        return
    header = ("STATE_ID", "TYPE", "STATUS", "VERSION", "UPDATED_AT")
    rows = [
        (
            s["state_id"],
            s["type"],
            s["status"],
            str(s["version"]),
            isoformat(s["updated_at"].replace(microsecond=0)) or "",
        )
        for s in page
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo("  ".join(cells).rstrip())
    click.echo(f"Page {page.page} of {max(page.pages, 1)} ({page.total} state(s)).", err=True)


@states.command("list", short_help="List live states, a page at a time.")
@click.option("--type", "state_type", callback=_known_type, help="Only states of this type.")
@_paging
@with_appcontext
def list_states(
    state_type: str | None, page: int, per_page: int, order_by: str, as_json: bool
) -> None:
    """List live states (not deleted nor expired), newest first, one page at a time.

    Prints a table, or with --json one JSON record per line; the page count goes
    to standard error.
    """
    with _clear_errors():
        found = _manager().search_states(
            state_type, page=page, per_page=per_page, order_by=order_by
        )
    _print_page(found, as_json)


@states.command("search", short_help="Search states of a type by FILTERs.")
@click.argument("state_type", metavar="TYPE", callback=_known_type)
@click.argument("filters", metavar="FILTER...", nargs=-1, callback=_parse_filters)
@_paging
@with_appcontext
def search(
    state_type: str,
    filters: dict[str, Any],
    page: int,
    per_page: int,
    order_by: str,
    as_json: bool,
) -> None:
    """Search live states of TYPE; every FILTER must match.

    A FILTER is FIELD=VALUE, FIELD a column (status, name, ...) or a dotted
    path into data or metadata, with an optional operator suffix (__ne __gt
    __gte __lt __lte __in __contains __exists). VALUE is read as JSON when it
    parses, else as a string:

        flask states search user data.status=active data.age__gte=30

        flask states search user 'data.plan__in=["pro", "team"]' data.code='"007"'
    """
    with _clear_errors():
        found = _manager().search_states(
            state_type, filters, page=page, per_page=per_page, order_by=order_by
        )
    _print_page(found, as_json)


# -- changing a state ------------------------------------------------------------------


def _parse_data(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        data = codec.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}.", ctx=ctx, param=param) from None
    if not isinstance(data, dict):
        raise click.BadParameter(
            'must be a JSON object, e.g. \'{"reason": "fraud"}\'.', ctx=ctx, param=param
        )
    return data


@states.command("transition", short_help="Apply a lifecycle transition to a state.")
@click.argument("state_id")
@click.argument("transition_name", metavar="TRANSITION")
@click.option(
    "--data",
    metavar="JSON",
    callback=_parse_data,
    help="Replace the state's data with this JSON object in the same change.",
)
@click.option(
    "--actor", default="cli", show_default=True, help="Who makes the change, for the history."
)
@click.option(
    "--expected-version",
    type=click.IntRange(1),
    help="Refuse unless the state is at this version (optimistic concurrency).",
)
@with_appcontext
def transition(
    state_id: str,
    transition_name: str,
    data: dict[str, Any] | None,
    actor: str,
    expected_version: int | None,
) -> None:
    """Apply TRANSITION (activate, suspend, ...) to a state and print the new record.

    It goes through the same pipeline as the Python API: lifecycle rules,
    validators, history, signals and callbacks.
    """
    with _clear_errors():
        state = _manager().transition(
            state_id, transition_name, data=data, actor=actor, expected_version=expected_version
        )
    click.echo(codec.dumps_str(state.to_json()))


# -- statistics --------------------------------------------------------------------------


@states.command("stats", short_help="States by type and status, history, cache.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@with_appcontext
def stats(as_json: bool) -> None:
    """Show states by type and status, history entries, the store and the cache hit rate.

    Deleted and expired states (kept with their history) are counted under
    their status. The hit rate is this process's, so mostly useful from a
    long-running shell; it is null without a Redis cache.
    """
    manager = _manager()
    with _clear_errors():
        store = manager.store
        tally = store.tally()
    by_type = {t: dict(sorted(s.items())) for t, s in sorted(tally.states.items())}
    report = {
        "store": store.kind,
        "states": sum(sum(by_status.values()) for by_status in by_type.values()),
        "by_type": by_type,
        "history_entries": tally.history,
        "cache_hit_rate": store.cache_hit_rate,
        "cache": store.cache_stats(),
    }
    if as_json:
        click.echo(codec.dumps_str(report))
        return
    click.echo(f"Store: {store.kind}")
    click.echo(f"States: {report['states']}")
    for type_name, by_status in by_type.items():
        counts = ", ".join(f"{status} {n}" for status, n in by_status.items())
        click.echo(f"  {type_name}: {sum(by_status.values())} ({counts})")
    click.echo(f"History entries: {tally.history}")
    if report["cache"] is None:
        click.echo("Cache: none")
    else:
        rate = store.cache_hit_rate
        shown = "no reads yet" if rate is None else f"{rate:.1%}"
        click.echo(f"Cache hit rate: {shown} (this process)")


# -- export and import -------------------------------------------------------------------


@states.command("export", short_help="Export states and history as JSON lines.")
@click.option("--type", "state_type", callback=_known_type, help="Only states of this type.")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, allow_dash=True),
    default="-",
    show_default=True,
    help="File to write; '-' is standard output.",
)
@with_appcontext
def export(state_type: str | None, output: str) -> None:
    """Write every state with its full history as JSON lines, and their checksum.

    Deleted and expired states are included. Import the file into any store
    with `flask states import`: equal checksums at both ends prove an
    identical copy. A progress bar shows on standard error unless the data
    goes to standard output.
    """
    store = _manager().store
    to_stdout = output == "-"
    try:
        out = click.open_file(output, "wb")
    except OSError as exc:
        raise click.BadParameter(str(exc), param_hint="'--output'") from None
    with out, _clear_errors():
        if to_stdout:
            summary = export_states(store, out, state_type=state_type)
        else:
            tally = store.tally()
            total = sum(
                sum(by_status.values())
                for name, by_status in tally.states.items()
                if state_type is None or name == state_type
            )
            with click.progressbar(length=total, label="Exporting", file=_stderr()) as bar:
                summary = export_states(store, out, state_type=state_type, progress=bar.update)
    click.echo(
        f"Exported {summary.states} state(s) with {summary.changes} change(s) "
        f"from the {store.kind} store.\nChecksum: {summary.checksum}",
        err=to_stdout,
    )


def _stderr() -> TextIO:
    return sys.stderr  # looked up per call: the test runner swaps it


@states.command("import", short_help="Import an export into this store.")
@click.argument("source", metavar="[FILE]", type=click.File("rb"), default="-")
@click.option(
    "--replace", is_flag=True, help="Overwrite states the store already holds, with their history."
)
@with_appcontext
def import_(source: IO[bytes], replace: bool) -> None:
    """Restore states and their history from an export (FILE or standard input).

    FILE is what `flask states export` wrote; '-' or nothing reads standard
    input. Every line is checked before anything is written; then each state is
    stored with its history exactly as exported (versions, change ids,
    timestamps), all or nothing per state, without validators, signals or new
    history entries. A state the store already holds makes the import refuse,
    unless --replace. Prints the checksum of the file and of the stored copy,
    read back from the store; they must be equal.
    """
    manager = _manager()
    store = manager.store
    with _clear_errors():
        with prepare_import(
            store,
            source,
            manager.get_type,
            replace=replace,
            check_keys=manager.check_encrypted,
            max_depth=manager._runtime().settings.max_depth,
        ) as prepared:
            with click.progressbar(
                length=prepared.states, label="Importing", file=_stderr()
            ) as bar:
                summary = prepared.restore(progress=bar.update)
    click.echo(
        f"Imported {summary.states} state(s) with {summary.changes} change(s) "
        f"into the {store.kind} store.\n"
        f"Checksum of the file:  {summary.checksum}\n"
        f"Checksum of the store: {summary.stored_checksum}"
    )
    if summary.stored_checksum != summary.checksum:
        raise click.ClickException(
            "The stored copy differs from the file: the store changed a value on the way "
            "(see the checksums above)."
        )


@states.command("rotate-keys")
@_batch_size("States (or rows) read and rewritten per batch.")
@with_appcontext
def rotate_keys(batch_size: int) -> None:
    """Re-encrypt every encrypted field, in states and history, with the first key.

    Put the new key first in STATEMANAGER_ENCRYPTION_KEYS, keep the old ones
    after it, run this, then remove the old keys. Versions and history stay as
    they are. Safe to run again after an interruption.
    """
    with _clear_errors():
        total, batches, counts = _manager().rotate_encryption_keys(batch_size=batch_size)
        with click.progressbar(length=total, label="Re-encrypting", file=_stderr()) as bar:
            for done in batches:
                bar.update(done)
    click.echo(
        f"Re-encrypted {counts['states']} state(s) and {counts['changes']} history entr"
        f"{'y' if counts['changes'] == 1 else 'ies'} with the first key."
    )


@states.command("migrate")
@click.option(
    "--type",
    "state_type",
    callback=_known_type,
    help="Only this type (default: every type with migrations).",
)
@_batch_size("States read and written per batch (one commit each).")
@with_appcontext
def migrate(state_type: str | None, batch_size: int) -> None:
    """Upgrade stored states to their type's newest data schema version.

    Each upgrade is written as an 'update' change with actor 'migration'.
    States already at the newest version are skipped, so an interrupted run
    continues where it stopped when started again.
    """
    with _clear_errors():
        run = _manager().migrate_states(state_type, batch_size=batch_size)
        with click.progressbar(length=run.total, label="Migrating", file=_stderr()) as bar:
            for done in run.batches:
                bar.update(done)
    click.echo(f"Upgraded {run.upgraded} state(s); {run.current} already at the newest version.")


@states.command("prune")
@click.option("--type", "state_type", callback=_known_type, help="Only this state type.")
@click.option("--dry-run", is_flag=True, help="Count what would be removed; remove nothing.")
@_batch_size("States per batch; each batch commits on its own.")
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
    with _clear_errors():
        if state_type is not None:
            types = [manager.get_type(state_type)]
        else:
            types = list(manager.types.values())
        settings = manager._runtime().settings
        total = sum(manager.store.type_size(t.name) for t in types if has_retention(t, settings))
        with click.progressbar(length=total, label="Pruning", file=_stderr()) as bar:
            report = manager.prune(
                state_type,
                dry_run=dry_run,
                batch_size=batch_size,
                progress=lambda _type, batch: bar.update(batch.states),
            )
    verb = "Would remove" if dry_run else "Removed"
    for name, (entries, purged) in sorted(report.types.items()):
        click.echo(f"  {name}: {entries} history entries, {purged} deleted state(s)")
    click.echo(
        f"{verb} {report.entries} history entries and purged {report.purged} deleted state(s) "
        f"of {report.states} examined."
    )
