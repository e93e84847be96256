"""Index projects by account and name: listing an account's projects, one name per account.

Revision ID: 0003_projects_account_name
Revises: 0002_projects
Create Date: 2025-01-06 09:20:00

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003_projects_account_name"
down_revision: str | Sequence[str] | None = "0002_projects"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_projects_account_id_name", "projects", ["account_id", "name"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_projects_account_id_name", table_name="projects")
