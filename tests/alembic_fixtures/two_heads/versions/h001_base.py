"""Test revision h001_base."""

import sqlalchemy as sa
from alembic import op

revision = "h001_base"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("base_things", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("base_things")
