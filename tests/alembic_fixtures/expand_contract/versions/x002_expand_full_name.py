"""Expand: rename accounts.display_name to full_name, additively (see the example in
tenant_migrations/versions for the documented version)."""

import sqlalchemy as sa
from alembic import op

revision = "x002_expand_full_name"
down_revision = "x001_accounts"
branch_labels = ("expand",)
depends_on = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("full_name", sa.String(200), nullable=True))
    op.execute("UPDATE accounts SET full_name = display_name WHERE full_name IS NULL")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION accounts_sync_full_name() RETURNS trigger AS $$
            BEGIN
              IF NEW.full_name IS NULL THEN NEW.full_name := NEW.display_name; END IF;
              IF NEW.display_name IS NULL THEN NEW.display_name := NEW.full_name; END IF;
              RETURN NEW;
            END $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            "CREATE TRIGGER accounts_sync_full_name BEFORE INSERT OR UPDATE ON accounts "
            "FOR EACH ROW EXECUTE FUNCTION accounts_sync_full_name()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER accounts_sync_full_name ON accounts")
        op.execute("DROP FUNCTION accounts_sync_full_name()")
    op.drop_column("accounts", "full_name")
