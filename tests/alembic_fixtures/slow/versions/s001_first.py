"""Test revision s001_first."""

import sqlalchemy as sa
from alembic import op

revision = "s001_first"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("first_things", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("first_things")
