"""Alembic environment of flask-statemanager's tables; run by :mod:`flask_statemanager.alembic`.

Reads everything from ``config.attributes`` (no ``alembic.ini``): the
``connection`` to migrate, or in offline mode the ``dialect_name`` and the
``output`` stream, and the ``table_prefix``. The applied revision is recorded
in ``<prefix>alembic_version``. For contributors' ``autogenerate`` the target
is the model in :mod:`flask_statemanager.stores.sql_tables`, with its column
types rendered as the portable types the revisions use.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from alembic.script import write_hooks

from flask_statemanager.alembic import owned_tables, version_table
from flask_statemanager.stores.sql_tables import JSONDocument, UTCDateTime, make_tables

config = context.config
prefix: str = config.attributes["table_prefix"]


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render the model's dialect-switching types as the plain types revisions use."""
    if type_ == "type" and isinstance(obj, JSONDocument):
        autogen_context.imports.add("from sqlalchemy.dialects import postgresql")
        return 'sa.Text().with_variant(postgresql.JSONB(), "postgresql")'
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


@write_hooks.register("statemanager_prefix")
def _prefix_names(filename: str, options: Any) -> None:
    """In a generated revision, write the scratch database's table names with ``prefix``.

    ``'statemanager_history'`` becomes ``f"{prefix}history"`` and
    ``'ix_statemanager_states_x'`` ``f"ix_{prefix}states_x"``, so the revision
    serves every ``STATEMANAGER_TABLE_PREFIX``.
    """
    path = Path(filename)
    quoted = re.compile(r"(['\"])(ix_|uq_)?" + re.escape(prefix) + r"(\w*)\1")
    path.write_text(quoted.sub(r'f"\2{prefix}\3"', path.read_text()))


def _include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Compare only this package's tables, never the application's."""
    return type_ != "table" or name in owned_tables(prefix)


options: dict[str, Any] = {
    "version_table": version_table(prefix),
    "target_metadata": make_tables(prefix)[0],
    "render_item": _render_item,
    "include_name": _include_name,
    "compare_type": True,
}

if context.is_offline_mode():
    context.configure(
        dialect_name=config.attributes["dialect_name"],
        output_buffer=config.attributes["output"],
        literal_binds=True,
        **options,
    )
else:
    context.configure(connection=config.attributes["connection"], **options)

with context.begin_transaction():
    context.run_migrations()
