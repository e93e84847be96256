"""Test revision s003_last."""

import sqlalchemy as sa
from alembic import op

revision = "s003_last"
down_revision = "s002_sleepy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("last_things", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("last_things")
