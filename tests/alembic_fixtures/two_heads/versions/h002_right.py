"""Test revision h002_right."""

import sqlalchemy as sa
from alembic import op

revision = "h002_right"
down_revision = "h001_base"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("right_things", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("right_things")
