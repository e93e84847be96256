"""Contract: drop accounts.display_name, now that every application reads full_name.

The second half of the blue/green rename begun in 0005_expand_full_name, on the ``contract``
branch. ``migrate_tenants --phase contract`` runs it only once every target in scope has
finished the expand phase; a new tenant's plain migration to head applies both at once.

Revision ID: 0006_contract_drop_display_name
Revises: 0004_accounts_display_name
Create Date: 2025-02-03 10:05:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_contract_drop_display_name"
down_revision: str | Sequence[str] | None = "0004_accounts_display_name"
branch_labels: str | Sequence[str] | None = ("contract",)
depends_on: str | Sequence[str] | None = "0005_expand_full_name"


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER accounts_sync_full_name ON accounts")
        op.execute("DROP FUNCTION accounts_sync_full_name()")
    drop_column("accounts", "display_name")


def downgrade() -> None:
    # Back to the expanded state: both columns, kept in step on PostgreSQL.
    op.add_column("accounts", sa.Column("display_name", sa.String(200), nullable=True))
    op.execute("UPDATE accounts SET display_name = full_name")
    if op.get_context().dialect.name == "postgresql":
        op.execute(EXPANDED_SYNC_FUNCTION)
        op.execute(EXPANDED_SYNC_TRIGGER)


EXPANDED_SYNC_FUNCTION = """
CREATE FUNCTION accounts_sync_full_name() RETURNS trigger AS $$
BEGIN
  IF NEW.full_name IS NULL THEN NEW.full_name := NEW.display_name; END IF;
  IF NEW.display_name IS NULL THEN NEW.display_name := NEW.full_name; END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql
"""
EXPANDED_SYNC_TRIGGER = (
    "CREATE TRIGGER accounts_sync_full_name BEFORE INSERT OR UPDATE ON accounts "
    "FOR EACH ROW EXECUTE FUNCTION accounts_sync_full_name()"
)


def drop_column(table, column):
    """Drop a column on every provider. SQLite has ALTER TABLE ... DROP COLUMN since 3.35, which
    (unlike a batch table rebuild) needs no reflection, so the SQL preview works offline too."""
    if op.get_context().dialect.name == "sqlite":
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    else:
        op.drop_column(table, column)
