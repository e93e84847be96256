"""Test revision f003_broken."""

import sqlalchemy as sa
from alembic import op

revision = "f003_broken"
down_revision = "f002_gadgets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("gizmos", sa.Column("id", sa.Integer(), primary_key=True))
    # Fails on every database: the table does not exist.
    op.execute("INSERT INTO no_such_table (id) VALUES (1)")


def downgrade() -> None:
    op.drop_table("gizmos")
