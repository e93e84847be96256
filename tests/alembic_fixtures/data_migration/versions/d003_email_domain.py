"""A data migration that reads the rows and iterates over them: accounts.email_domain, filled
from each address. It needs a live database (offline, ``op.get_bind()`` returns no rows to
iterate: ``TypeError``)."""

import sqlalchemy as sa
from alembic import op

revision = "d003_email_domain"
down_revision = "d002_backfill_status"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("email_domain", sa.String(255), nullable=True))
    bind = op.get_bind()
    for row_id, email in bind.execute(sa.text("SELECT id, email FROM accounts")):
        bind.execute(
            sa.text("UPDATE accounts SET email_domain = :domain WHERE id = :id"),
            {"domain": email.rsplit("@", 1)[-1], "id": row_id},
        )


def downgrade() -> None:
    op.drop_column("accounts", "email_domain")
