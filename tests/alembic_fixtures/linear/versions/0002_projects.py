"""Create projects, each owned by an account.

Revision ID: 0002_projects
Revises: 0001_accounts
Create Date: 2025-01-06 09:10:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_projects"
down_revision: str | Sequence[str] | None = "0001_accounts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.current_timestamp(),
        ),
        sa.PrimaryKeyConstraint("id", name="pk_projects"),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name="fk_projects_account_id_accounts",
            ondelete="CASCADE",
        ),
    )
    # Index the foreign key ourselves: PostgreSQL and SQL Server never do it by themselves, and
    # MySQL drops the index it made for the key as soon as another index starts with
    # account_id (0003), which would then make 0003's index impossible to drop.
    op.create_index("ix_projects_account_id", "projects", ["account_id"])


def downgrade() -> None:
    op.drop_table("projects")
