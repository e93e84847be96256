"""Add accounts.display_name (nullable: existing accounts have none yet).

Revision ID: 0004_accounts_display_name
Revises: 0003_projects_account_name
Create Date: 2025-01-06 09:30:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_accounts_display_name"
down_revision: str | Sequence[str] | None = "0003_projects_account_name"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode: SQLite cannot drop a column in place (see downgrade); elsewhere it is a plain
    # ALTER TABLE.
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("display_name", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("display_name")
