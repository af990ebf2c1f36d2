"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
% if imports:
${imports}
% endif

from flask_statemanager.alembic import table_prefix

revision = ${repr(up_revision)}
down_revision: str | None = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    prefix = table_prefix()
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    prefix = table_prefix()
    ${downgrades if downgrades else "pass"}
