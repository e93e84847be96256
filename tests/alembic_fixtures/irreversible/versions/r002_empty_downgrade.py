"""A column, whose downgrade was forgotten."""

import sqlalchemy as sa
from alembic import op

revision = "r002_empty_downgrade"
down_revision = "r001_base"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("things", sa.Column("label", sa.String(50)))


def downgrade() -> None:
    pass
