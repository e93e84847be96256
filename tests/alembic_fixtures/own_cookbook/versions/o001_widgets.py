"""Test revision o001_widgets, whose downgrade fails (it drops a table that does not exist)."""

import sqlalchemy as sa
from alembic import op

revision = "o001_widgets"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("widgets", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.execute("DROP TABLE no_such_widgets")
