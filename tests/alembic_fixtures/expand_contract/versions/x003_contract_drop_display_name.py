"""Contract: drop accounts.display_name once every application reads full_name."""

import sqlalchemy as sa
from alembic import op

revision = "x003_contract_drop_display_name"
down_revision = "x001_accounts"
branch_labels = ("contract",)
depends_on = "x002_expand_full_name"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER accounts_sync_full_name ON accounts")
        op.execute("DROP FUNCTION accounts_sync_full_name()")
    op.drop_column("accounts", "display_name")


def downgrade() -> None:
    op.add_column("accounts", sa.Column("display_name", sa.String(200), nullable=True))
    op.execute("UPDATE accounts SET display_name = full_name")
