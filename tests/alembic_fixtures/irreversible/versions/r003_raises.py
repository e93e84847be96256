"""A data migration that cannot be undone."""

from alembic import op

revision = "r003_raises"
down_revision = "r002_empty_downgrade"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("UPDATE things SET label = 'x'")


def downgrade() -> None:
    raise NotImplementedError("labels cannot be restored")
