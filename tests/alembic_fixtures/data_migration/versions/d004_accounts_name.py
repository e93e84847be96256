"""Add accounts.name: an ordinary schema change after the data migrations."""

import sqlalchemy as sa
from alembic import op

revision = "d004_accounts_name"
down_revision = "d003_email_domain"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("name", sa.String(100), nullable=True))


def downgrade() -> None:
    op.drop_column("accounts", "name")
