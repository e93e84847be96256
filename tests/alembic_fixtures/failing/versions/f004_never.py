"""Test revision f004_never."""

import sqlalchemy as sa
from alembic import op

revision = "f004_never"
down_revision = "f003_broken"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("never_created", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("never_created")
