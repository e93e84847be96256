"""Test revision h002_left."""

import sqlalchemy as sa
from alembic import op

revision = "h002_left"
down_revision = "h001_base"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("left_things", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("left_things")
