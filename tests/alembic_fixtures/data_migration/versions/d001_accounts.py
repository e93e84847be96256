"""Accounts with a status."""

import sqlalchemy as sa
from alembic import op

revision = "d001_accounts"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("email", sa.String(255), nullable=False),
        sa.Column("status", sa.String(20), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("accounts")
