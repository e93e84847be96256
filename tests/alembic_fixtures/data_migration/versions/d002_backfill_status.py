"""A data migration as many are written: an untyped ``sa.column()`` updated with a Python value.

Online it is an ordinary UPDATE with a bound parameter; Alembic's offline mode renders literal
values and cannot, for a column with no type (``CompileError: No literal value renderer``).
"""

import sqlalchemy as sa
from alembic import op

revision = "d002_backfill_status"
down_revision = "d001_accounts"
branch_labels = None
depends_on = None

accounts = sa.table("accounts", sa.column("status"))


def upgrade() -> None:
    op.execute(accounts.update().where(accounts.c.status.is_(None)).values(status="active"))


def downgrade() -> None:
    op.execute(accounts.update().values(status=None))
