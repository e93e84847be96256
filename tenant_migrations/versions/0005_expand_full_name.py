"""Expand: accounts.display_name becomes accounts.full_name, additively.

The first half of a blue/green rename (docs/blue-green.md), on the ``expand`` branch: the old
application keeps reading and writing ``display_name``, the new one uses ``full_name``. The new
column is added and backfilled; on PostgreSQL a trigger fills whichever of the two columns a
writer left empty, so both application versions can write while they run side by side. (On
MySQL, SQL Server and SQLite the new application writes both columns until the contract phase.)

Revision ID: 0005_expand_full_name
Revises: 0004_accounts_display_name
Create Date: 2025-02-03 10:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_expand_full_name"
down_revision: str | Sequence[str] | None = "0004_accounts_display_name"
branch_labels: str | Sequence[str] | None = ("expand",)
depends_on: str | Sequence[str] | None = None

SYNC_FUNCTION = """
CREATE FUNCTION accounts_sync_full_name() RETURNS trigger AS $$
BEGIN
  IF NEW.full_name IS NULL THEN NEW.full_name := NEW.display_name; END IF;
  IF NEW.display_name IS NULL THEN NEW.display_name := NEW.full_name; END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql
"""
SYNC_TRIGGER = (
    "CREATE TRIGGER accounts_sync_full_name BEFORE INSERT OR UPDATE ON accounts "
    "FOR EACH ROW EXECUTE FUNCTION accounts_sync_full_name()"
)


def upgrade() -> None:
    op.add_column("accounts", sa.Column("full_name", sa.String(200), nullable=True))
    op.execute("UPDATE accounts SET full_name = display_name WHERE full_name IS NULL")
    if op.get_context().dialect.name == "postgresql":
        op.execute(SYNC_FUNCTION)
        op.execute(SYNC_TRIGGER)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER accounts_sync_full_name ON accounts")
        op.execute("DROP FUNCTION accounts_sync_full_name()")
    drop_column("accounts", "full_name")


def drop_column(table, column):
    """Drop a column on every provider. SQLite has ALTER TABLE ... DROP COLUMN since 3.35, which
    (unlike a batch table rebuild) needs no reflection, so the SQL preview works offline too."""
    if op.get_context().dialect.name == "sqlite":
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    else:
        op.drop_column(table, column)
