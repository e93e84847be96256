"""A table, with a real downgrade."""

import sqlalchemy as sa
from alembic import op

revision = "r001_base"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("things", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("things")
