"""Test revision f001_widgets."""

import sqlalchemy as sa
from alembic import op

revision = "f001_widgets"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("widgets", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("widgets")
