"""Test revision o003_gizmos."""

import sqlalchemy as sa
from alembic import op

revision = "o003_gizmos"
down_revision = "o002_gadgets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("gizmos", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("gizmos")
