"""Test revision o002_gadgets."""

import sqlalchemy as sa
from alembic import op

revision = "o002_gadgets"
down_revision = "o001_widgets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("gadgets", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("gadgets")
